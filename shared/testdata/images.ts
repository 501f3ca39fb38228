/**
 * Realistic VM images for tests, demos and benchmarks, generated deterministically (no committed
 * blobs): a base disk made of this machine's real files, a base memory of zero, page-cache, heap and
 * random pages, and current images derived from them the way a running VM changes them.
 */
import { mkdir, open, readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PAGE_SIZE } from '../image/pages.js';

export interface ImageSetOptions {
  dir: string;
  memoryBytes: number;
  diskBytes: number;
  seed?: number;
  /** rough share of pages that differ from base in each image */
  dirtyFraction?: number;
  /**
   * What the VM writes into the pages it changes. `mixed` (default): heap-like structures, text of a
   * small vocabulary and 15% random bytes; all of it compresses about as well at zstd-3 as at -19.
   * `programs`: mostly slices of this machine's executables and libraries, a program's code and
   * data in memory, 5% random; executables compress noticeably smaller at zstd-19 than at zstd-3,
   * the trade-off a tuner weighs.
   */
  content?: 'mixed' | 'programs';
}

export interface ImageSet {
  baseMemory: string;
  memory: string;
  baseDisk: string;
  disk: string;
}

/** xorshift128+ reduced to 32-bit outputs: fast, seeded, the same everywhere. */
class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  constructor(seed: number) {
    // splitmix32 to spread a small seed over the state
    let s = seed >>> 0 || 1;
    const next = (): number => {
      s = (s + 0x9e3779b9) >>> 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.a = next();
    this.b = next();
    this.c = next();
    this.d = next() || 1;
  }

  u32(): number {
    // xoshiro128** step
    const result = Math.imul(((Math.imul(this.b, 5) << 7) | (Math.imul(this.b, 5) >>> 25)) >>> 0, 9) >>> 0;
    const t = (this.b << 9) >>> 0;
    this.c ^= this.a;
    this.d ^= this.b;
    this.b ^= this.c;
    this.a ^= this.d;
    this.c ^= t;
    this.d = ((this.d << 11) | (this.d >>> 21)) >>> 0;
    return result;
  }

  /** uniform in [0, 1) */
  float(): number {
    return this.u32() / 4294967296;
  }

  int(n: number): number {
    return Math.floor(this.float() * n);
  }

  fill(target: Uint8Array): void {
    const words = new Uint32Array(target.buffer, target.byteOffset, target.byteLength >>> 2);
    for (let i = 0; i < words.length; i++) words[i] = this.u32();
  }
}

const REAL_FILE_ROOTS = ['/usr/share/common-licenses', '/usr/share/doc', '/etc', '/usr/bin', '/usr/lib/x86_64-linux-gnu', '/usr/lib'];
const MAX_FILE_BYTES = 8 * 1024 * 1024;

/** This machine's real files, in a stable order, until `wanted` bytes are gathered. */
async function realFiles(wanted: number, roots = REAL_FILE_ROOTS): Promise<Buffer[]> {
  const out: Buffer[] = [];
  let total = 0;
  const seen = new Set<string>();
  const walk = async (dir: string, depth: number): Promise<void> => {
    if (total >= wanted || depth > 4) return;
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch {
      return;
    }
    entries.sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0));
    for (const e of entries) {
      if (total >= wanted) return;
      const path = join(dir, e.name);
      if (e.isDirectory()) await walk(path, depth + 1);
      else if (e.isFile() && !seen.has(path)) {
        seen.add(path);
        try {
          const data = await readFile(path);
          if (data.byteLength === 0 || data.byteLength > MAX_FILE_BYTES) continue;
          out.push(data);
          total += data.byteLength;
        } catch {
          // unreadable: skip
        }
      }
    }
  };
  for (const root of roots) await walk(root, 0);
  return out;
}

const PROGRAM_ROOTS = ['/usr/bin', '/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib'];

/** Executables and libraries of this machine, concatenated (up to `wanted` bytes). */
async function programBytes(wanted: number): Promise<Buffer> {
  const files = await realFiles(wanted, PROGRAM_ROOTS);
  return files.length > 0 ? Buffer.concat(files).subarray(0, wanted) : Buffer.alloc(0);
}

/** A page from anywhere in `pool` (not page-aligned, so it repeats no page of a file on disk), one byte changed. */
function programLike(rng: Rng, pool: Buffer, page: Buffer): void {
  if (pool.byteLength < PAGE_SIZE * 2) {
    heapLike(rng, page);
    return;
  }
  pool.copy(page, 0, rng.int(pool.byteLength - PAGE_SIZE));
  flipByte(rng, page);
}

const WORDS = 'the of and to in is for on that with as by this from at be are or an it not config value error return struct file data page memory cloudlet handoff'.split(' ');

function textLike(rng: Rng, target: Uint8Array): void {
  let at = 0;
  while (at < target.byteLength) {
    const word = WORDS[rng.int(WORDS.length)]!;
    for (let i = 0; i < word.length && at < target.byteLength; i++) target[at++] = word.charCodeAt(i);
    if (at < target.byteLength) target[at++] = rng.int(12) === 0 ? 10 : 32;
  }
}

/** Heap-like: small integers, pointers sharing their high bytes, short strings. */
function heapLike(rng: Rng, page: Uint8Array): void {
  const view = new DataView(page.buffer, page.byteOffset, page.byteLength);
  const region = 0x7f00 + rng.int(16);
  for (let at = 0; at < page.byteLength; at += 8) {
    const kind = rng.int(4);
    if (kind === 0) view.setUint32(at, rng.int(256), true);
    else if (kind === 1) {
      view.setUint32(at, (rng.u32() & 0xfffff0) >>> 0, true);
      view.setUint32(at + 4, region, true);
    } else if (kind === 2) textLike(rng, page.subarray(at, at + 8));
    // kind 3: left zero
  }
}

/** Changes one byte (never to itself). */
function flipByte(rng: Rng, page: Buffer): void {
  const at = rng.int(PAGE_SIZE);
  page[at] = page[at]! ^ (1 + rng.int(255));
}

function pageOf(buf: Buffer, index: number): Buffer {
  return buf.subarray(index * PAGE_SIZE, (index + 1) * PAGE_SIZE);
}

function checkSize(name: string, bytes: number): void {
  if (!Number.isInteger(bytes) || bytes <= 0 || bytes % PAGE_SIZE !== 0) throw new RangeError(`${name} must be a positive multiple of ${PAGE_SIZE}`);
}

async function buildBaseDisk(rng: Rng, bytes: number): Promise<{ disk: Buffer; files: Buffer[]; usedPages: number }> {
  const disk = Buffer.alloc(bytes);
  const used = Math.floor(bytes * 0.7);
  const files = await realFiles(used + Math.floor(bytes * 0.1));
  let at = 0;
  let next = 0;
  // files start page-aligned, as a filesystem places them; the last 30% stays free (zeros)
  while (at < used) {
    const file = files[next++];
    if (!file) {
      textLike(rng, disk.subarray(at, used));
      at = used;
      break;
    }
    const n = Math.min(file.byteLength, used - at);
    file.copy(disk, at, 0, n);
    at += Math.ceil(n / PAGE_SIZE) * PAGE_SIZE;
  }
  return { disk, files: files.slice(next), usedPages: Math.ceil(Math.min(at, used) / PAGE_SIZE) };
}

function buildBaseMemory(rng: Rng, bytes: number, disk: Buffer, diskUsedPages: number): Buffer {
  const memory = Buffer.alloc(bytes);
  const pages = bytes / PAGE_SIZE;
  for (let p = 0; p < pages; p++) {
    const r = rng.float();
    const page = pageOf(memory, p);
    if (r < 0.3) continue; // zero
    if (r < 0.55 && diskUsedPages > 0) pageOf(disk, rng.int(diskUsedPages)).copy(page); // page cache
    else if (r < 0.85) heapLike(rng, page);
    else rng.fill(page);
  }
  return memory;
}

function buildCurrentMemory(rng: Rng, base: Buffer, baseDisk: Buffer, currentDisk: Buffer, diskUsedPages: number, dirty: number, programs?: Buffer): Buffer {
  const memory = Buffer.from(base);
  const pages = base.byteLength / PAGE_SIZE;
  const changed: number[] = [];
  for (let p = 0; p < pages; p++) {
    if (rng.float() >= dirty) continue;
    const page = pageOf(memory, p);
    const r = rng.float();
    if (r < 0.25) {
      // a few bytes changed (counters, flags, pointers)
      const n = 1 + rng.int(8);
      for (let i = 0; i < n; i++) flipByte(rng, page);
    } else if (r < 0.4) {
      if (programs && r >= 0.3) programLike(rng, programs, page); // code and data of a program loaded
      else rng.fill(page); // new random data (encrypted or compressed content)
    } else if (r < 0.52) pageOf(rng.int(2) ? currentDisk : baseDisk, rng.int(Math.max(1, diskUsedPages))).copy(page); // page cache
    else if (r < 0.64) pageOf(base, rng.int(pages)).copy(page); // moved
    else if (r < 0.72) page.fill(0); // freed
    else if (r < 0.86) (programs ? programLike(rng, programs, page) : heapLike(rng, page));
    else if (changed.length > 0) pageOf(memory, changed[rng.int(changed.length)]!).copy(page); // the same content twice
    else heapLike(rng, page);
    changed.push(p);
  }
  return memory;
}

function buildCurrentDisk(rng: Rng, base: Buffer, spareFiles: Buffer[], usedPages: number, dirty: number, programs?: Buffer): Buffer {
  const disk = Buffer.from(base);
  const pages = base.byteLength / PAGE_SIZE;
  const budget = Math.floor(pages * dirty);
  let spent = 0;
  // files added into free space: real content, so it compresses and partly repeats the base
  let at = usedPages;
  const addPages = Math.floor(budget * 0.4);
  for (const file of spareFiles) {
    if (at - usedPages >= addPages || at >= pages) break;
    const n = Math.min(file.byteLength, (Math.min(pages, usedPages + addPages) - at) * PAGE_SIZE);
    file.copy(disk, at * PAGE_SIZE, 0, n);
    at += Math.ceil(n / PAGE_SIZE);
  }
  if (at - usedPages < addPages) {
    // not enough spare files: copies of base blocks (a file copied)
    for (; at < Math.min(pages, usedPages + addPages); at++) pageOf(base, rng.int(Math.max(1, usedPages))).copy(pageOf(disk, at));
  }
  spent += at - usedPages;
  // a file rewritten at an offset: a run of blocks, half text, half random
  const run = Math.min(Math.floor(budget * 0.3), Math.max(0, usedPages - 1));
  const start = rng.int(Math.max(1, usedPages - run));
  for (let i = 0; i < run; i++) {
    const page = pageOf(disk, start + i);
    if (programs) {
      // a program installed: its files, a little of it random (compressed resources)
      if (i < run * 0.85) programLike(rng, programs, page);
      else rng.fill(page);
    } else if (i < run / 2) textLike(rng, page);
    else rng.fill(page);
  }
  spent += run;
  // few-byte edits and zeroed blocks scattered over the used part
  while (spent < budget && usedPages > 0) {
    const page = pageOf(disk, rng.int(usedPages));
    if (rng.int(5) === 0) page.fill(0);
    else for (let i = 0, n = 1 + rng.int(4); i < n; i++) flipByte(rng, page);
    spent++;
  }
  return disk;
}

export async function generateImageSet(opts: ImageSetOptions): Promise<ImageSet> {
  checkSize('memoryBytes', opts.memoryBytes);
  checkSize('diskBytes', opts.diskBytes);
  const dirty = opts.dirtyFraction ?? 0.25;
  if (!(dirty > 0 && dirty <= 1)) throw new RangeError('dirtyFraction must be in (0, 1]');
  const rng = new Rng(opts.seed ?? 1);
  await mkdir(opts.dir, { recursive: true });
  const { disk: baseDisk, files: spare, usedPages } = await buildBaseDisk(rng, opts.diskBytes);
  const baseMemory = buildBaseMemory(rng, opts.memoryBytes, baseDisk, usedPages);
  const programs = opts.content === 'programs' ? await programBytes(32 * 1024 * 1024) : undefined;
  const disk = buildCurrentDisk(rng, baseDisk, spare, usedPages, dirty, programs);
  const memory = buildCurrentMemory(rng, baseMemory, baseDisk, disk, usedPages, dirty, programs);
  const set: ImageSet = {
    baseMemory: join(opts.dir, 'base-memory.img'),
    memory: join(opts.dir, 'memory.img'),
    baseDisk: join(opts.dir, 'base-disk.img'),
    disk: join(opts.dir, 'disk.img'),
  };
  await Promise.all([writeWhole(set.baseMemory, baseMemory), writeWhole(set.memory, memory), writeWhole(set.baseDisk, baseDisk), writeWhole(set.disk, disk)]);
  return set;
}

async function writeWhole(path: string, data: Buffer): Promise<void> {
  const fh = await open(path, 'w');
  try {
    for (let at = 0; at < data.byteLength; ) at += (await fh.write(data, at, Math.min(16 << 20, data.byteLength - at), at)).bytesWritten;
  } finally {
    await fh.close();
  }
}

