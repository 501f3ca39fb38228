/** The summary's count of chunks per mode, as a migration that switched mode reports it. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { StatsCollector, formatSummary, type MigrationSummary } from '../../cli/summary.js';
import type { StageStats } from '../../shared/model/migration.js';
import { formatMode, type Mode } from '../../shared/model/mode.js';

const PATCH3: Mode = { delta: 'patch', compressor: 'zstd', level: 3 };
const XOR_ZSTD3: Mode = { delta: 'xor', compressor: 'zstd', level: 3 };

function stats(stage: string, seq: number, mode: Mode, next?: string): StageStats {
  return { stage, instance: 'h:1', migrationId: 'm-1', round: 0, seq, part: 0, pages: 256, bytesIn: 1 << 20, bytesOut: 1 << 19, cpuMs: 5, wallMs: 6, mode, ...(next ? { next } : {}) };
}

/** A verified migration's summary around what `c` collected. */
function summaryOf(c: StatsCollector, adaptive: boolean): MigrationSummary {
  return {
    migrationId: 'm-1',
    verified: true,
    handoffSeconds: 1,
    transferSeconds: 1,
    inputBytes: 0,
    wireBytes: 0,
    scannedBytes: 0,
    dirtyPages: 0,
    effectiveBps: 0,
    measuredBandwidthBps: 0,
    modes: [...c.chunksByMode.keys()],
    chunksByMode: Object.fromEntries(c.chunksByMode),
    adaptive,
    decisions: [],
    stages: c.stages,
  };
}

describe('summary', () => {
  test('chunks are counted in the mode they went to the wire in, once each', () => {
    const c = new StatsCollector();
    // a patch leaves delta for the wire; an xor chunk leaves delta for compress, and compress for the wire
    for (let seq = 0; seq < 3; seq++) c.add(stats('delta', seq, PATCH3, 'wire'));
    for (let seq = 3; seq < 8; seq++) {
      c.add(stats('delta', seq, XOR_ZSTD3, 'compress'));
      c.add(stats('compress', seq, XOR_ZSTD3, 'wire'));
    }
    assert.deepEqual(Object.fromEntries(c.chunksByMode), { [formatMode(PATCH3)]: 3, [formatMode(XOR_ZSTD3)]: 5 });
    const summary = summaryOf(c, true);
    assert.match(formatSummary(summary), /modes: delta=patch zstd:3 \(3 chunks\), delta=xor zstd:3 \(5 chunks\) \(adaptive/);
    // one mode: no counts
    assert.match(formatSummary({ ...summary, modes: [formatMode(PATCH3)], chunksByMode: { [formatMode(PATCH3)]: 8 } }), /modes: delta=patch zstd:3 \(adaptive/);
  });

  test("a stage's details sum its counts; a codec's CPU ms are shown whole", () => {
    const c = new StatsCollector();
    c.add({ ...stats('delta', 0, PATCH3, 'wire'), counts: { encoded: 200, kept: 0, codecCpuMs: 262.9558 } });
    c.add({ ...stats('delta', 1, PATCH3, 'wire'), counts: { encoded: 56, kept: 0, codecCpuMs: 263.0001 } });
    const text = formatSummary(summaryOf(c, false));
    assert.match(text, /encoded=256 kept=0 codecCpuMs=526/);
    assert.doesNotMatch(text, /codecCpuMs=525\.9/);
  });
});
