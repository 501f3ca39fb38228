/** The progress line's rate is the link's: the sender's average since its first chunk, not a burst over its last ACKs. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { progressLine } from '../../cli/progress.js';
import { StatsCollector } from '../../cli/summary.js';
import type { StageStats } from '../../shared/model/migration.js';

const RAW = { delta: 'none', compressor: 'none', level: 0 } as const;

function senderStats(seq: number, bytesOut: number): StageStats {
  return { stage: 'sender', instance: 'h:1', migrationId: 'm-1', round: 0, seq, part: 0, pages: 0, bytesIn: bytesOut, bytesOut, cpuMs: 0, wallMs: 5, mode: RAW, counts: { resentBytes: 0, reconnects: 0 } };
}

describe('progress line', () => {
  test('a 50 Mbit/s link whose last ACKs came in a burst shows about 50 Mbit/s', () => {
    const c = new StatsCollector();
    // the link probe, before any chunk: not a rate of what went over the link
    c.addLinkReport({ type: 'probed', migrationId: 'm-1', bandwidthBps: 48_000_000 });
    // ACKs after a rate cap's wait come back at loopback speed: the last ACKs read 336.9 Mbit/s
    for (let seq = 1; seq <= 3; seq++) {
      c.add(senderStats(seq, 7_864_320));
      c.addLinkReport({ type: 'measured', migrationId: 'm-1', bandwidthBps: 336_900_000, averageBandwidthBps: 49_600_000, linkBoundShare: 1 });
    }
    const line = progressLine('m-1', { fraction: 0.5, phase: 'sending', wireBytes: c.wireBytes, linkRateBps: c.measuredBandwidthBps }, 3.8);
    assert.match(line, /wire 22\.5 MiB @ 49\.6 Mbit\/s/);
    assert.doesNotMatch(line, /336/);
  });

  test('before the first ACK: nothing on the wire, no rate', () => {
    const c = new StatsCollector();
    c.addLinkReport({ type: 'probed', migrationId: 'm-1', bandwidthBps: 48_000_000 });
    assert.match(progressLine('m-1', { fraction: 0, phase: 'capturing', wireBytes: c.wireBytes, linkRateBps: c.measuredBandwidthBps }, 0.2), /wire 0 B @ 0 kbit\/s {2}0\.2 s, ETA \?$/);
  });

  test('the bar and the ETA', () => {
    const line = progressLine('m-1', { fraction: 0.25, phase: 'sending', wireBytes: 1024, linkRateBps: 1e6 }, 2);
    assert.equal(line, `m-1 [${'#'.repeat(8)}${'.'.repeat(22)}]  25% sending    wire 1.00 KiB @ 1.0 Mbit/s  2.0 s, ETA 6.0 s`);
  });
});
