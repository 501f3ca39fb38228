/** The ratio probe's one state: how RatioProbes moves it from the first look to over. */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { tunerConfig, type TunerConfig } from '../../services/tuner/config.js';
import { newFollowed } from '../../services/tuner/look.js';
import { probePlan } from '../../services/tuner/probe.js';
import { RatioProbes } from '../../services/tuner/probes.js';
import type { MigrationDescriptor } from '../../shared/model/migration.js';
import { createLogger } from '../../shared/telemetry/log.js';
import { generateImageSet, type ImageSet } from '../../shared/testdata/images.js';
import { MEASURED_LIKE_PROFILE as PROFILE } from './fixtures/tuner-profile.js';
import type { Followed } from '../../services/tuner/look.js';

/** read through a function, so the compiler does not keep the phase it saw before a call that moves it */
const phaseOf = (f: Followed): string => f.probe.phase;

const log = createLogger({ actor: 'tuner-test' });

function descriptor(images: ImageSet | undefined): MigrationDescriptor {
  const pair = (base: string, current: string) => ({ base, current, baseHash: '', bytes: 8 << 20 });
  return {
    migrationId: 'm',
    createdAtMs: 0,
    memory: images ? pair(images.baseMemory, images.memory) : pair('', ''),
    disk: images ? pair(images.baseDisk, images.disk) : pair('', ''),
    destination: 'nowhere:1',
    parts: 1,
    chunkPages: 256,
    bandwidthCapBps: 0,
    mode: { delta: 'patch', compressor: 'zstd', level: 3 },
    adaptive: true,
  };
}

describe("the ratio probe's state", () => {
  let dir: string;
  let images: ImageSet;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'probe-state-'));
    images = await generateImageSet({ dir, memoryBytes: 8 << 20, diskBytes: 8 << 20, seed: 3 });
  });
  after(() => rm(dir, { recursive: true, force: true }));

  const probesWith = (overrides: Partial<TunerConfig> = {}): { probes: RatioProbes; config: TunerConfig } => {
    const config = tunerConfig(overrides);
    return { probes: new RatioProbes(PROFILE, config, log), config };
  };

  test('put off: it waits for its time and a link-bound look; without a memory image it is over', () => {
    const { probes, config } = probesWith();
    const f = newFollowed(PROFILE, config, 0);
    assert.equal(phaseOf(f), 'first-look');
    probes.putOff(f, probePlan(PROFILE), 1000);
    assert.equal(phaseOf(f), 'put-off');
    assert.equal(f.probe.phase === 'put-off' && f.probe.dueMs, 1000 + config.laterProbeAfterMs);
    // due, but no look has found the link the bottleneck
    probes.startPutOffIfDue('m', descriptor(images), f, 1000 + config.laterProbeAfterMs);
    assert.equal(phaseOf(f), 'put-off');
    const streamed = newFollowed(PROFILE, config, 0);
    void probes.startAndWait('m', descriptor(undefined), streamed, probePlan(PROFILE), 0);
    assert.equal(phaseOf(streamed), 'over', "the RAM comes from QEMU's stream: nothing to sample");
  });

  test('awaited by the first look, then over with its ratios in use', async () => {
    const { probes, config } = probesWith({ probeWaitMs: 60_000 });
    const f = newFollowed(PROFILE, config, 0);
    f.acceptedAtMs = performance.now();
    const profiled = f.tuner.estimator.ratioBasisOf(PROFILE.modes[1]!.mode);
    const waited = probes.startAndWait('m', descriptor(images), f, probePlan(PROFILE), performance.now());
    assert.equal(phaseOf(f), 'awaited');
    await waited;
    assert.equal(phaseOf(f), 'over');
    assert.notEqual(f.tuner.estimator.ratioBasisOf(PROFILE.modes[1]!.mode), profiled, "the probe's ratio replaced the profile's");
  });

  test('a first look that stops waiting leaves it running, and it is over once in', async () => {
    const { probes, config } = probesWith({ probeWaitMs: 0 });
    const f = newFollowed(PROFILE, config, 0);
    f.acceptedAtMs = performance.now();
    await probes.startAndWait('m', descriptor(images), f, probePlan(PROFILE), performance.now());
    assert.equal(phaseOf(f), 'running');
    const probe = f.probe as Followed['probe'];
    if (probe.phase === 'running') await probe.run.done;
    assert.equal(phaseOf(f), 'over');
  });
});
