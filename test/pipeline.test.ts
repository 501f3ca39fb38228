/**
 * End to end through real nats-servers (one per cloudlet) and actor processes: the destination's
 * images must be byte-identical to the source's, whatever the mode, worker count or partitioning.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { join } from 'node:path';
import { imageDigest } from '../shared/image/base-index.js';
import { hashImageFile as sha256File } from '../shared/image/pages.js';
import type { MigrationSummary } from '../cli/summary.js';
import { formatMode, type Mode } from '../shared/model/mode.js';
import { HEAD_START_CHUNKS } from '../shared/model/migration.js';
import { handoff, makeWorkspace, type Workspace } from './helpers/cloudlets.js';

let ws: Workspace;
let sourceHashes: { memory: string; disk: string };
let sourceDigests: { memory: string; disk: string };

before(async () => {
  ws = await makeWorkspace(16 << 20, 16 << 20);
  sourceHashes = { memory: await sha256File(ws.images.memory), disk: await sha256File(ws.images.disk) };
  sourceDigests = { memory: await imageDigest(ws.images.memory), disk: await imageDigest(ws.images.disk) };
});
after(() => ws.cleanup());

async function assertIdentical(summary: MigrationSummary, outDir: string): Promise<void> {
  assert.equal(summary.verified, true, `not verified: ${summary.reason}`);
  assert.equal(await sha256File(join(outDir, 'memory.img')), sourceHashes.memory, 'rebuilt memory differs');
  assert.equal(await sha256File(join(outDir, 'disk.img')), sourceHashes.disk, 'rebuilt disk differs');
  // what capture reported is the digest of the images as they are on disk
  assert.deepEqual(summary.sourceHashes, sourceDigests);
  assert.deepEqual(summary.rebuild?.rebuiltHashes, sourceDigests);
  assert.ok(summary.dirtyPages > 0 && summary.inputBytes === summary.dirtyPages * 4096);
  assert.ok(summary.wireBytes > 0);
}

describe('handoff pipeline over NATS JetStream', { timeout: 300_000 }, () => {
  const modes: [string, Mode][] = [
    ['none', { delta: 'none', compressor: 'none', level: 0 }],
    ['lz4', { delta: 'xor', compressor: 'lz4', level: 0 }],
    ['zstd', { delta: 'zstd', compressor: 'zstd', level: 3 }],
    ['patch', { delta: 'patch', compressor: 'zstd', level: 9 }],
  ];
  for (const [name, mode] of modes) {
    test(`mode ${name}: images byte-identical`, async () => {
      const { summary, dest } = await handoff(ws, { mode });
      await assertIdentical(summary, dest.outDir);
      if (mode.compressor === 'none' && mode.delta === 'none') {
        // nothing to do for delta and compress: chunks go straight from dedup to the wire
        assert.equal(summary.stages.compress, undefined);
        assert.equal(summary.stages.delta, undefined);
        assert.ok(summary.wireBytes >= summary.stages.dedup!.bytesOut);
      } else if (mode.delta === 'patch') {
        // compressed in delta, against the base: compress never sees a chunk
        assert.equal(summary.stages.compress, undefined);
        assert.ok(summary.stages.delta!.chunks > 0);
        assert.deepEqual(summary.modes, ['delta=patch zstd:9']);
        assert.ok(summary.wireBytes < summary.inputBytes, 'patch made nothing smaller');
      } else {
        assert.ok(summary.stages.compress!.chunks > 0);
        assert.ok(summary.wireBytes < summary.inputBytes, 'compression made nothing smaller');
      }
      const dedup = summary.stages.dedup!.counts;
      assert.ok(dedup.zero! + dedup.base! + dedup.sent! > 0, 'dedup found nothing on realistic data');
    });
  }

  test('3 compress workers share one work queue: identical images', async () => {
    const { summary, dest } = await handoff(ws, { compressWorkers: 3, chunkPages: 16 });
    await assertIdentical(summary, dest.outDir);
    const compress = summary.stages.compress!;
    assert.ok(compress.instances >= 2 && compress.instances <= 3, `compress instances ${compress.instances}`);
  });

  test('2 dedup instances, each owning a partition of the hash space: identical images', async () => {
    const { summary, dest } = await handoff(ws, { dedupInstances: 2 });
    await assertIdentical(summary, dest.outDir);
    assert.equal(summary.stages.dedup!.instances, 2);
    assert.ok(summary.stages.dedup!.counts.sent! > 0, 'duplicates within the migration were not found across partitions');
  });

  const changes: [Mode, Mode][] = [
    [{ delta: 'xor', compressor: 'zstd', level: 3 }, { delta: 'none', compressor: 'lz4', level: 0 }],
    [{ delta: 'xor', compressor: 'zstd', level: 3 }, { delta: 'patch', compressor: 'zstd', level: 3 }],
  ];
  for (const [first, second] of changes) test(`mode changed mid-migration to ${formatMode(second)}: the receiver decodes both, images identical`, async () => {
    let changed = false;
    const { summary, dest } = await handoff(ws, {
      mode: first,
      chunkPages: 8,
      onStarted: ({ bus, migrationId, stats }) => {
        const timer = setInterval(() => {
          if ((stats.stages.compress?.chunks ?? 0) > 0) {
            clearInterval(timer);
            changed = true;
            void bus.config.put(migrationId, JSON.stringify(second));
          }
        }, 5);
      },
    });
    assert.ok(changed);
    await assertIdentical(summary, dest.outDir);
    assert.ok(summary.modes.includes(formatMode(first)), `modes ${summary.modes}`);
    assert.ok(summary.modes.includes(formatMode(second)), `modes ${summary.modes}`);
  });

  test('adaptive: started uncompressed on a slow link, the tuner switches to compression once the sender has probed it', async () => {
    const { summary, dest } = await handoff(ws, { adaptive: true, mode: { delta: 'none', compressor: 'none', level: 0 }, bandwidthCapBps: 4e6 });
    await assertIdentical(summary, dest.outDir);
    assert.equal(summary.adaptive, true);
    assert.ok(summary.decisions.length >= 1, 'the tuner never switched');
    const first = summary.decisions[0]!;
    assert.equal(first.from, 'delta=none none');
    assert.notEqual(first.to, 'delta=none none');
    assert.ok(first.predictedChosenBlocksPerSec > first.predictedCurrentBlocksPerSec);
    // decided on the probe, before any chunk was acknowledged: loopback is fast, the sender's cap is 4 Mbit/s
    assert.equal(first.measuredBandwidthBps, 0);
    assert.ok(first.probedBandwidthBps !== undefined && first.probedBandwidthBps > 2e6 && first.probedBandwidthBps <= 4e6, `probed ${first.probedBandwidthBps}`);
    assert.equal(first.bandwidthBps, first.probedBandwidthBps);
    // the start mode was far from the best: the look waited for the ratio probe, and says when it decided
    assert.ok(first.probeWaitSeconds !== undefined && first.probeWaitSeconds > 0, `probe wait ${first.probeWaitSeconds}`);
    assert.ok(first.atSeconds >= first.probeWaitSeconds - 0.01, `decided at ${first.atSeconds} s, after a ${first.probeWaitSeconds} s wait`);
    // chunks really went out in the chosen mode, not only the config; and capture held all but its
    // head start for that first look, so at most those went out in the start mode
    const sent = Object.values(summary.chunksByMode).reduce((a, n) => a + n, 0);
    assert.equal(sent, summary.stages.capture!.counts.slices, 'every chunk counted in its mode');
    assert.ok(sent > 2 * HEAD_START_CHUNKS, `only ${sent} chunks: the head start proves nothing`);
    assert.ok((summary.chunksByMode[first.to] ?? 0) > 0, `chunks by mode ${JSON.stringify(summary.chunksByMode)}`);
    assert.ok((summary.chunksByMode['delta=none none'] ?? 0) <= HEAD_START_CHUNKS, `chunks went out in the start mode after the head start: ${JSON.stringify(summary.chunksByMode)}`);
  });

  test('adaptive: started in a mode the profile holds near the best on a slow link, the first look decides at once, without waiting for the ratio probe', async () => {
    const { summary, dest } = await handoff(ws, { adaptive: true, mode: { delta: 'patch', compressor: 'zstd', level: 3 }, bandwidthCapBps: 4e6 });
    await assertIdentical(summary, dest.outDir);
    const first = summary.decisions[0];
    assert.ok(first, 'no look recorded');
    assert.equal(first.from, 'delta=patch zstd:3');
    assert.ok(first.probedBandwidthBps !== undefined && first.probedBandwidthBps <= 4e6, `probed ${first.probedBandwidthBps}`);
    // the probe comes later, for the looks after: no look waited for it
    const waited = summary.decisions.find((d) => d.probeWaitSeconds !== undefined);
    assert.equal(waited, undefined, `a look at ${waited?.atSeconds} s waited ${waited?.probeWaitSeconds} s for the ratio probe`);
  });
});
