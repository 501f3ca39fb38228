/** The tuner's ratio probe: where it reads, what it samples, what it finds on real image files. */
import assert from 'node:assert/strict';
import { copyFile, mkdtemp, rm } from 'node:fs/promises';
import { getPriority, tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { modeKey } from '../../services/tuner/model.js';
import { PROBE_NICE, runProbeProcess } from '../../services/tuner/probe-process.js';
import { DEFAULT_PROBE_OPTIONS, PROBE_MAX_CPU_MS_PER_BLOCK, probePlaces, probePlan, probeRatios, sampleDirtyPages } from '../../services/tuner/probe.js';
import { loadProfile } from '../../services/tuner/profile.js';
import { measureProfile } from '../../cli/profile.js';
import { formatMode, type Mode } from '../../shared/model/mode.js';
import { generateImageSet, type ImageSet } from '../../shared/testdata/images.js';

/** a repeatable sequence in [0, 1) */
function seeded(seed: number): () => number {
  let x = seed;
  return () => ((x = (x * 1_103_515_245 + 12_345) % 2 ** 31) / 2 ** 31);
}

const SIZE = 8 << 20;
const descriptorOf = (images: ImageSet): Parameters<typeof probeRatios>[0] => ({
  memory: { base: images.baseMemory, current: images.memory, bytes: SIZE },
  disk: { base: images.baseDisk, current: images.disk, bytes: SIZE },
  chunkPages: 256,
});

describe('ratio probe', () => {
  let dir = '';
  let images: ImageSet;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'probe-test-'));
    images = await generateImageSet({ dir, memoryBytes: SIZE, diskBytes: SIZE, seed: 7 });
  });
  after(() => rm(dir, { recursive: true, force: true }));

  test('places: inside each image, spread over both by size, in an order that mixes them', () => {
    const pagesOf = [1000, 3000] as const;
    const places = probePlaces(pagesOf, { runPages: 16, maxRuns: 40, random: seeded(1) });
    assert.ok(places.length >= 38 && places.length <= 42, `${places.length} places`);
    for (const p of places) assert.ok(p.index >= 0 && p.index + 16 <= pagesOf[p.image], `${p.image}:${p.index}`);
    assert.equal(places.filter((p) => p.image === 0).length, 10);
    assert.equal(places.filter((p) => p.image === 1).length, 30);
    assert.ok(new Set(places.slice(0, 10).map((p) => p.image)).size === 2, 'the first places read are all of one image');
    // an image smaller than the runs wanted: whole runs, none past its end
    const small = probePlaces([20, 0], { runPages: 16, maxRuns: 40, random: seeded(2) });
    assert.equal(small.length, 1);
    for (const p of small) assert.ok(p.image === 0 && p.index + 16 <= 20, `${p.image}:${p.index}`);
  });

  test('samples changed pages only, with their base pages', async () => {
    const { chunks, subsample, basePages } = await sampleDirtyPages(descriptorOf(images), { ...DEFAULT_PROBE_OPTIONS, random: seeded(3) });
    const pagesIn = (cs: typeof chunks): number => cs.reduce((n, c) => n + c.pageIndex.length, 0);
    const pages = pagesIn(chunks);
    assert.ok(pages >= DEFAULT_PROBE_OPTIONS.pages && pages < DEFAULT_PROBE_OPTIONS.pages + DEFAULT_PROBE_OPTIONS.runPages, `${pages} pages`);
    assert.equal(pagesIn(subsample), DEFAULT_PROBE_OPTIONS.subsamplePages);
    const inSample = new Set(chunks.flatMap((c) => [...c.pageIndex].map((index) => `${c.image}:${index}`)));
    for (const c of [...chunks, ...subsample]) assert.ok(c.pageIndex.every((index) => basePages.has(`${c.image}:${index}`)));
    for (const c of subsample) assert.ok(c.pageIndex.every((index) => inSample.has(`${c.image}:${index}`)), 'the subsample is part of the sample');
    // the same files as base and current: nothing changed, nothing to probe
    const same = join(dir, 'same.img');
    await copyFile(images.baseMemory, same);
    const unchanged = { memory: { base: images.baseMemory, current: same, bytes: SIZE }, disk: { base: images.baseMemory, current: same, bytes: SIZE } };
    assert.equal((await sampleDirtyPages(unchanged, DEFAULT_PROBE_OPTIONS)).chunks.length, 0);
    assert.equal(await probeRatios(unchanged, { modes: [{ delta: 'xor', compressor: 'zstd', level: 3 }], costly: [] }), undefined);
  });

  test("finds the VM's own ratios: modes in the order a whole-image measurement puts them", async () => {
    const profile = await loadProfile();
    const plan = probePlan(profile);
    assert.ok(plan.modes.length >= 12 && plan.modes.every((m) => !(m.compressor === 'zstd' && m.level === 19)), `${plan.modes.length} modes on the whole sample`);
    assert.equal(plan.modes.length + plan.costly.length, profile.modes.length);
    // costly modes the cores bound are left out; the cheap ones stay
    const xor19Only = probePlan(profile, (m) => m.delta === 'xor');
    assert.deepEqual(xor19Only.modes, plan.modes);
    assert.deepEqual(
      xor19Only.costly.map((c) => formatMode(c.mode)),
      plan.costly.filter((c) => c.mode.delta === 'xor').map((c) => formatMode(c.mode)),
    );
    assert.ok(xor19Only.costly.length >= 1 && xor19Only.costly.length < plan.costly.length);
    for (const { mode, reference } of plan.costly) {
      const cost = profile.modes.find((m) => modeKey(m.mode) === modeKey(mode))!;
      assert.ok(cost.deltaCpuMsPerBlock + cost.compressCpuMsPerBlock > PROBE_MAX_CPU_MS_PER_BLOCK);
      // beside the strongest cheap level of its delta and compressor (zstd-9; for patch, patch-3 where patch-9 is costly too)
      const cheapLevels = plan.modes.filter((m) => m.delta === mode.delta && m.compressor === mode.compressor).map((m) => m.level);
      assert.deepEqual(reference, { ...mode, level: Math.max(...cheapLevels) }, `${formatMode(mode)} beside ${formatMode(reference)}`);
    }
    const probe = await probeRatios(descriptorOf(images), plan, { random: seeded(4) });
    assert.ok(probe);
    assert.equal(probe.ratios.size, profile.modes.length);
    assert.ok(probe.blocks >= 32 && probe.pagesRead >= probe.blocks);
    const whole = await measureProfile(images, 'test');
    const ratioOf = (ratios: Map<string, number>, m: Mode): number => ratios.get(modeKey(m))!;
    const wholeRatios = new Map(whole.modes.map((c) => [modeKey(c.mode), c.ratio]));
    const xor3: Mode = { delta: 'xor', compressor: 'zstd', level: 3 };
    const plain3: Mode = { delta: 'none', compressor: 'zstd', level: 3 };
    const xorOnly: Mode = { delta: 'xor', compressor: 'none', level: 0 };
    const xor19: Mode = { delta: 'xor', compressor: 'zstd', level: 19 };
    assert.equal(ratioOf(probe.ratios, { delta: 'none', compressor: 'none', level: 0 }), 1);
    for (const [better, worse] of [
      [xor3, plain3],
      [xor3, xorOnly],
      [xor19, xor3],
    ] as const) {
      assert.ok(ratioOf(wholeRatios, better) < ratioOf(wholeRatios, worse), `whole: ${formatMode(better)} < ${formatMode(worse)}`);
      assert.ok(ratioOf(probe.ratios, better) < ratioOf(probe.ratios, worse), `probe: ${formatMode(better)} < ${formatMode(worse)}`);
    }
    // a sample, not the whole: within a third of the whole image's figure
    for (const m of profile.modes.map((c) => c.mode)) {
      const r = ratioOf(probe.ratios, m) / ratioOf(wholeRatios, m);
      assert.ok(r > 0.67 && r < 1.5, `${formatMode(m)}: probe/whole ${r.toFixed(2)}`);
    }
  });

  test("in the tuner's own process: the same ratios as in a process of its own, yielding to other work, and it stops when told", async () => {
    const profile = await loadProfile();
    const plan = probePlan(profile);
    let turns = 0;
    const ticking = setInterval(() => turns++, 0); // the probe yields: other work runs meanwhile
    const running = new AbortController();
    const probe = await probeRatios(descriptorOf(images), plan, { random: seeded(4), shareWith: running.signal }).finally(() => clearInterval(ticking));
    const alone = await probeRatios(descriptorOf(images), plan, { random: seeded(4) });
    assert.ok(probe && alone);
    assert.deepEqual(probe.ratios, alone.ratios, 'sharing the process changed the ratios');
    assert.ok(turns > 0, 'the probe held the event loop from start to end');
    // stopped once it has begun: no ratios
    const stopping = new AbortController();
    const stopped = probeRatios(descriptorOf(images), plan, { random: seeded(4), shareWith: stopping.signal });
    stopping.abort();
    assert.equal(await stopped, undefined);
  });

  test('in a process of its own at the priority asked for: every mode, and an error that names what failed', async () => {
    const profile = await loadProfile();
    const { probe, niceness } = await runProbeProcess({ images: descriptorOf(images), plan: probePlan(profile) }, PROBE_NICE);
    assert.equal(niceness, Math.min(19, getPriority() + PROBE_NICE), 'not lowered');
    assert.ok(probe, 'no probe result');
    assert.equal(probe.ratios.size, profile.modes.length);
    const ratio = (m: Mode): number => probe.ratios.get(modeKey(m))!;
    assert.ok(ratio({ delta: 'xor', compressor: 'zstd', level: 3 }) < ratio({ delta: 'xor', compressor: 'none', level: 0 }));
    assert.equal(ratio({ delta: 'none', compressor: 'none', level: 0 }), 1);
    const missing = { ...descriptorOf(images), disk: { base: images.baseDisk, current: join(dir, 'gone.img'), bytes: SIZE } };
    // at the tuner's own priority where its answer decides
    await assert.rejects(runProbeProcess({ images: missing, plan: probePlan(profile) }, 0), /gone\.img/);
    const unchanged = { ...descriptorOf(images), memory: { base: images.baseMemory, current: images.baseMemory, bytes: SIZE }, disk: { base: images.baseDisk, current: images.baseDisk, bytes: SIZE } };
    assert.deepEqual(await runProbeProcess({ images: unchanged, plan: probePlan(profile) }, 0), { niceness: getPriority() }, 'nothing to probe, at the tuner\'s priority');
  });

  test('an image it cannot read: an error naming the file', async () => {
    const missing = { ...descriptorOf(images), disk: { base: images.baseDisk, current: join(dir, 'gone.img'), bytes: SIZE } };
    await assert.rejects(probeRatios(missing, { modes: [{ delta: 'xor', compressor: 'zstd', level: 3 }], costly: [] }), /gone\.img/);
  });
});
