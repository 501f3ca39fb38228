/** The generated images are deterministic and have the properties the pipeline is tested against. */
import assert from 'node:assert/strict';
import { readFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { BlockCompressor } from '../shared/codecs/block.js';
import { hashImageFile } from '../shared/image/pages.js';
import { generateImageSet } from '../shared/testdata/images.js';

const dirs: string[] = [];
after(() => Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true }))));
const MiB = 1 << 20;

async function gen(seed: number, dirtyFraction = 0.25) {
  const dir = await mkdtemp(join(tmpdir(), 'handoff-gen-'));
  dirs.push(dir);
  return generateImageSet({ dir, memoryBytes: 8 * MiB, diskBytes: 8 * MiB, seed, dirtyFraction });
}

test('same seed, same bytes; another seed, another VM', async () => {
  const [a, b, c] = await Promise.all([gen(3), gen(3), gen(4)]);
  for (const k of ['baseMemory', 'memory', 'baseDisk', 'disk'] as const) assert.equal(await hashImageFile(a[k]), await hashImageFile(b[k]), k);
  assert.notEqual(await hashImageFile(a.memory), await hashImageFile(c.memory));
});

test('realistic: dirty share, zero pages, page cache, moved and repeated pages', async () => {
  const s = await gen(5, 0.25);
  const [baseMemory, memory, baseDisk, disk] = await Promise.all([readFile(s.baseMemory), readFile(s.memory), readFile(s.baseDisk), readFile(s.disk)]);
  const page = (b: Buffer, i: number): Buffer => b.subarray(i * 4096, (i + 1) * 4096);
  const pages = memory.byteLength / 4096;
  const key = (p: Buffer): string => p.toString('latin1');
  const baseMemoryPages = new Map<string, number>();
  for (let i = 0; i < pages; i++) if (!baseMemoryPages.has(key(page(baseMemory, i)))) baseMemoryPages.set(key(page(baseMemory, i)), i);
  const baseDiskPages = new Set<string>();
  for (let i = 0; i < baseDisk.byteLength / 4096; i++) baseDiskPages.add(key(page(baseDisk, i)));
  let dirty = 0;
  let zero = 0;
  let fromDisk = 0;
  let moved = 0;
  const dirtyContent = new Map<string, number>();
  for (let i = 0; i < pages; i++) {
    const p = page(memory, i);
    if (p.every((b) => b === 0)) zero++;
    if (p.equals(page(baseMemory, i))) continue;
    dirty++;
    if (baseDiskPages.has(key(p))) fromDisk++;
    const at = baseMemoryPages.get(key(p));
    if (at !== undefined && at !== i && !p.every((b) => b === 0)) moved++;
    dirtyContent.set(key(p), (dirtyContent.get(key(p)) ?? 0) + 1);
  }
  assert.ok(dirty / pages > 0.125 && dirty / pages < 0.5, `dirty share ${dirty / pages}`);
  assert.ok(zero > 0, 'no zero pages');
  assert.ok(fromDisk > 0, 'no page-cache pages');
  assert.ok(moved > 0, 'no moved pages');
  assert.ok([...dirtyContent.values()].some((n) => n > 1), 'no content repeated among dirty pages');
  let diskDirty = 0;
  for (let i = 0; i < disk.byteLength / 4096; i++) if (!page(disk, i).equals(page(baseDisk, i))) diskDirty++;
  const share = diskDirty / (disk.byteLength / 4096);
  assert.ok(share > 0.05 && share <= 0.5, `disk dirty share ${share}`);
});

test("content 'programs': changed pages compress like programs, zstd-19 well ahead of zstd-3", async () => {
  /** zstd-19 output over zstd-3 output for the memory pages that changed, in 256 KiB pieces as chunks go */
  const levelGain = async (content: 'mixed' | 'programs'): Promise<number> => {
    const dir = await mkdtemp(join(tmpdir(), 'handoff-gen-'));
    dirs.push(dir);
    const s = await generateImageSet({ dir, memoryBytes: 8 * MiB, diskBytes: 8 * MiB, seed: 7, content });
    const [base, memory] = await Promise.all([readFile(s.baseMemory), readFile(s.memory)]);
    const changed: Buffer[] = [];
    for (let i = 0; i < memory.byteLength / 4096; i++) {
      const p = memory.subarray(i * 4096, (i + 1) * 4096);
      if (!p.equals(base.subarray(i * 4096, (i + 1) * 4096))) changed.push(p);
    }
    const all = Buffer.concat(changed);
    const compressor = new BlockCompressor();
    const size = (level: number): number => {
      let out = 0;
      for (let at = 0; at < all.byteLength; at += 256 * 1024) out += compressor.compress(all.subarray(at, at + 256 * 1024), 'zstd', level).byteLength;
      return out;
    };
    return size(19) / size(3);
  };
  const [mixed, programs] = [await levelGain('mixed'), await levelGain('programs')];
  console.log(`zstd-19 / zstd-3 of the changed memory pages: mixed ${mixed.toFixed(3)}, programs ${programs.toFixed(3)}`);
  // measured here: 0.968 and 0.937 (this machine's executables)
  assert.ok(programs < mixed - 0.01, `programs ${programs.toFixed(3)} vs mixed ${mixed.toFixed(3)}`);
});
