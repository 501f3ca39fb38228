/** The tuner's ratio probe: where it reads, what it samples, what it finds on real image files. */
import assert from 'node:assert/strict';
import { copyFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { modeKey } from '../../services/tuner/model.js';
import { DEFAULT_PROBE_OPTIONS, PROBE_MAX_CPU_MS_PER_BLOCK, probePlaces, probeRatios, probedModes, sampleDirtyPages } from '../../services/tuner/probe.js';
import { loadProfile, measureProfile } from '../../services/tuner/profile.js';
import { formatMode, type Mode } from '../../shared/mode.js';
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
    const { chunks, basePages } = await sampleDirtyPages(descriptorOf(images), { ...DEFAULT_PROBE_OPTIONS, random: seeded(3) });
    const pages = chunks.reduce((n, c) => n + c.pageIndex.length, 0);
    assert.ok(pages >= DEFAULT_PROBE_OPTIONS.pages && pages < DEFAULT_PROBE_OPTIONS.pages + DEFAULT_PROBE_OPTIONS.runPages, `${pages} pages`);
    for (const c of chunks) assert.ok(c.pageIndex.every((index) => basePages.has(`${c.image}:${index}`)));
    // the same files as base and current: nothing changed, nothing to probe
    const same = join(dir, 'same.img');
    await copyFile(images.baseMemory, same);
    const unchanged = { memory: { base: images.baseMemory, current: same, bytes: SIZE }, disk: { base: images.baseMemory, current: same, bytes: SIZE } };
    assert.equal((await sampleDirtyPages(unchanged, DEFAULT_PROBE_OPTIONS)).chunks.length, 0);
    assert.equal(await probeRatios(unchanged, [{ delta: 'xor', compressor: 'zstd', level: 3 }]), undefined);
  });

  test("finds the VM's own ratios: modes in the order a whole-image measurement puts them", async () => {
    const profile = await loadProfile();
    const modes = probedModes(profile);
    assert.ok(modes.length < profile.modes.length && modes.length >= 12, `${modes.length} modes probed`);
    assert.ok(!modes.some((m) => m.compressor === 'zstd' && m.level === 19), 'zstd-19 probed');
    for (const m of profile.modes) if (!modes.some((p) => modeKey(p) === modeKey(m.mode))) assert.ok(m.deltaCpuMsPerBlock + m.compressCpuMsPerBlock > PROBE_MAX_CPU_MS_PER_BLOCK);
    const probe = await probeRatios(descriptorOf(images), modes, { random: seeded(4) });
    assert.ok(probe);
    assert.equal(probe.ratios.size, modes.length);
    assert.ok(probe.blocks >= 32 && probe.pagesRead >= probe.blocks);
    const whole = await measureProfile(images, 'test');
    const ratioOf = (ratios: Map<string, number>, m: Mode): number => ratios.get(modeKey(m))!;
    const wholeRatios = new Map(whole.modes.map((c) => [modeKey(c.mode), c.ratio]));
    const xor3: Mode = { delta: 'xor', compressor: 'zstd', level: 3 };
    const plain3: Mode = { delta: 'none', compressor: 'zstd', level: 3 };
    const xorOnly: Mode = { delta: 'xor', compressor: 'none', level: 0 };
    assert.equal(ratioOf(probe.ratios, { delta: 'none', compressor: 'none', level: 0 }), 1);
    for (const [better, worse] of [
      [xor3, plain3],
      [xor3, xorOnly],
    ] as const) {
      assert.ok(ratioOf(wholeRatios, better) < ratioOf(wholeRatios, worse), `whole: ${formatMode(better)} < ${formatMode(worse)}`);
      assert.ok(ratioOf(probe.ratios, better) < ratioOf(probe.ratios, worse), `probe: ${formatMode(better)} < ${formatMode(worse)}`);
    }
    // a sample, not the whole: within a third of the whole image's figure
    for (const m of modes) {
      const r = ratioOf(probe.ratios, m) / ratioOf(wholeRatios, m);
      assert.ok(r > 0.67 && r < 1.5, `${formatMode(m)}: probe/whole ${r.toFixed(2)}`);
    }
  });

  test('an image it cannot read: an error naming the file', async () => {
    const missing = { ...descriptorOf(images), disk: { base: images.baseDisk, current: join(dir, 'gone.img'), bytes: SIZE } };
    await assert.rejects(probeRatios(missing, [{ delta: 'xor', compressor: 'zstd', level: 3 }]), /gone\.img/);
  });
});
