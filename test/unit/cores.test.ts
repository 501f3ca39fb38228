/**
 * The actors' pure cores, chained in-process: capture -> dedup -> delta -> compress -> Rebuilder must
 * reproduce the current images for every delta x compressor, in any chunk order, with duplicates.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { ChunkBuilder, dirtyPagesOf, partitionOf } from '../../services/capture/core.js';
import { ChunkCompressor } from '../../services/compress/core.js';
import { DeltaEncoder } from '../../services/delta/core.js';
import { HashLocationMap, addBaseIndex, dedupChunk } from '../../services/dedup/core.js';
import { Rebuilder, type PageStore } from '../../services/receiver/core.js';
import { PageKind, type Chunk } from '../../shared/model/chunk.js';
import { decodeChunk, encodeChunk } from '../../shared/wire/chunk-codec.js';
import { MalformedMessageError, VerificationError } from '../../shared/model/errors.js';
import { COMPRESSORS, DELTA_ALGORITHMS, checkMode, compressionFor, isMode, isModeConfig, type Mode, type ModeConfig } from '../../shared/model/mode.js';
import { createCompressActor } from '../../services/compress/service.js';
import { nextStage } from '../../shared/actor/stage.js';
import { createLogger } from '../../shared/telemetry/log.js';
import type { MigrationDescriptor } from '../../shared/model/migration.js';
import { threadCpuMs } from '../../shared/cpu/thread-cpu.js';
import { PAGE_SIZE, STRONG_HASH_BYTES, digestOfPageHashes, pageCheck, strongHash, type ImageId } from '../../shared/image/pages.js';

const PAGES = 96;
const page = (b: Buffer, i: number): Buffer => b.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
const flip = (b: Uint8Array, at: number, bits = 1): void => {
  b[at] = b[at]! ^ bits;
};

function hashIndex(image: Buffer): Buffer {
  const out = Buffer.alloc((image.byteLength / PAGE_SIZE) * STRONG_HASH_BYTES);
  for (let i = 0; i < image.byteLength / PAGE_SIZE; i++) strongHash(page(image, i)).copy(out, i * STRONG_HASH_BYTES);
  return out;
}

/** A small VM whose changes exercise every page kind. */
function smallVm(): { base: [Buffer, Buffer]; current: [Buffer, Buffer] } {
  const baseMemory = randomBytes(PAGES * PAGE_SIZE);
  const baseDisk = Buffer.from('disk block text '.repeat((PAGES * PAGE_SIZE) / 16));
  for (let i = 0; i < PAGES; i++) baseDisk.writeUInt32LE(i, i * PAGE_SIZE);
  const memory = Buffer.from(baseMemory);
  const disk = Buffer.from(baseDisk);
  for (let i = 0; i < PAGES; i += 3) flip(page(memory, i), 10, 0x11); // few bytes: xor/zstd delta
  page(memory, 1).fill(0); // zero
  page(baseDisk, 40).copy(page(memory, 2)); // page cache: equal to a base disk block
  page(baseMemory, 50).copy(page(memory, 4)); // moved
  randomBytes(PAGE_SIZE).copy(page(memory, 5)); // new
  page(memory, 5).copy(page(memory, 80)); // the same new content twice: Sent
  page(memory, 5).copy(page(disk, 90)); // and once more in the other image
  flip(page(disk, 7), 100);
  page(disk, 8).fill(0);
  return { base: [baseMemory, baseDisk], current: [memory, disk] };
}

class MemoryStore implements PageStore {
  readonly rebuilt: [Buffer, Buffer];
  constructor(readonly base: [Buffer, Buffer]) {
    this.rebuilt = [Buffer.from(base[0]), Buffer.from(base[1])];
  }
  pageCount(image: ImageId): number {
    return this.base[image].byteLength / PAGE_SIZE;
  }
  readBase(image: ImageId, index: number): Uint8Array {
    return Buffer.from(page(this.base[image], index));
  }
  readRebuilt(image: ImageId, index: number): Uint8Array {
    return Buffer.from(page(this.rebuilt[image], index));
  }
  writeRebuilt(image: ImageId, index: number, data: Uint8Array): void {
    page(this.rebuilt[image], index).set(data);
  }
}

function capture(vm: ReturnType<typeof smallVm>, parts: number, chunkPages: number, migrationId = 'unit'): Chunk[] {
  const chunks: Chunk[] = [];
  let seq = 0;
  for (const image of [0, 1] as ImageId[]) {
    const builder = new ChunkBuilder({ migrationId, round: 0, image, parts }, chunkPages, seq);
    for (const p of dirtyPagesOf(vm.current[image], 0, hashIndex(vm.base[image]))) if (builder.add(p)) chunks.push(...builder.take());
    if (builder.pending) chunks.push(...builder.take());
    seq = builder.nextSeq;
  }
  return chunks;
}

function pipeline(vm: ReturnType<typeof smallVm>, mode: Mode, parts = 1, chunkPages = 7): Chunk[] {
  const base = new HashLocationMap();
  addBaseIndex(base, 0, hashIndex(vm.base[0]));
  addBaseIndex(base, 1, hashIndex(vm.base[1]));
  const sent = Array.from({ length: parts }, () => new HashLocationMap());
  const delta = new DeltaEncoder((image, index) => Buffer.from(page(vm.base[image], index)));
  const compressor = new ChunkCompressor();
  return capture(vm, parts, chunkPages).map((c) => {
    const d = dedupChunk(decodeChunk(encodeChunk(c)), base, sent[c.part]!).chunk;
    const e = delta.encode(d, mode.delta, mode.level).chunk;
    // as the stages route it: a patch leaves delta compressed
    return decodeChunk(encodeChunk(e.mode.compressor === 'none' ? compressor.compress(e, mode) : e));
  });
}

function rebuild(vm: ReturnType<typeof smallVm>, chunks: Chunk[]): { store: MemoryStore; rebuilder: Rebuilder } {
  const store = new MemoryStore(vm.base);
  const rebuilder = new Rebuilder(store, 'unit', [hashIndex(vm.base[0]), hashIndex(vm.base[1])]);
  for (const c of chunks) rebuilder.apply(c);
  return { store, rebuilder };
}

describe('capture core', () => {
  test('dirty pages are those whose hash differs from the reference, past its end too', () => {
    const vm = smallVm();
    const dirty = dirtyPagesOf(vm.current[0], 0, hashIndex(vm.base[0]));
    const expected = [];
    for (let i = 0; i < PAGES; i++) if (!page(vm.current[0], i).equals(page(vm.base[0], i))) expected.push(i);
    assert.deepEqual(dirty.map((d) => d.index), expected);
    assert.equal(dirtyPagesOf(vm.current[0], 0, hashIndex(vm.base[0]).subarray(0, 16 * 10)).length, expected.filter((i) => i < 10).length + PAGES - 10);
  });
  test('chunks: one slice per partition (empty ones too), pages copied, checks are xxh64', () => {
    const vm = smallVm();
    const builder = new ChunkBuilder({ migrationId: 'unit', round: 0, image: 0, parts: 3 }, 1000);
    const dirty = dirtyPagesOf(vm.current[0], 0, hashIndex(vm.base[0]));
    for (const p of dirty) builder.add(p);
    const firstIndex = dirty[0]!.index;
    const original = Buffer.from(page(vm.current[0], firstIndex));
    page(vm.current[0], firstIndex).fill(0xee); // the capture buffer is reused: the chunk keeps its copy
    const slices = builder.take();
    assert.equal(slices.length, 3);
    assert.deepEqual(slices.map((s) => s.part), [0, 1, 2]);
    assert.equal(slices.reduce((n, s) => n + s.pageIndex.length, 0), dirty.length);
    for (const s of slices) {
      for (let i = 0; i < s.pageIndex.length; i++) {
        assert.equal(partitionOf(s.strongHash!.subarray(i * 16), 3), s.part);
        const body = Buffer.from(s.body.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
        assert.equal(Buffer.from(s.check).readBigUInt64LE(i * 8), pageCheck(body));
        if (s.pageIndex[i] === firstIndex) assert.deepEqual(body, original);
      }
    }
    assert.equal(builder.nextSeq, 1);
    assert.equal(builder.take().every((s) => s.pageIndex.length === 0 && s.seq === 1), true);
  });
});

describe('dedup core', () => {
  test('zero, base (memory or disk), already sent; idempotent on redelivery', () => {
    const vm = smallVm();
    const base = new HashLocationMap();
    addBaseIndex(base, 0, hashIndex(vm.base[0]));
    addBaseIndex(base, 1, hashIndex(vm.base[1]));
    const sent = new HashLocationMap();
    const chunks = capture(vm, 1, 1000);
    const out = chunks.map((c) => dedupChunk(c, base, sent).chunk);
    const kindOf = (image: number, index: number): { kind: number; ref: [number, number] } => {
      const c = out.find((o) => o.image === image && o.pageIndex.includes(index))!;
      const i = c.pageIndex.indexOf(index);
      return { kind: c.kind[i]!, ref: [c.refImage[i]!, c.refIndex[i]!] };
    };
    assert.equal(kindOf(0, 1).kind, PageKind.Zero);
    assert.deepEqual(kindOf(0, 2), { kind: PageKind.Base, ref: [1, 40] });
    assert.deepEqual(kindOf(0, 4), { kind: PageKind.Base, ref: [0, 50] });
    assert.equal(kindOf(0, 5).kind, PageKind.Raw);
    assert.deepEqual(kindOf(0, 80), { kind: PageKind.Sent, ref: [0, 5] });
    assert.deepEqual(kindOf(1, 90), { kind: PageKind.Sent, ref: [0, 5] });
    for (const o of out) {
      assert.equal(o.strongHash, undefined);
      assert.equal(o.body.byteLength, [...o.kind].filter((k) => k === PageKind.Raw).length * PAGE_SIZE);
    }
    // the same chunk again (redelivered): the first occurrence stays in full, no self-reference
    assert.equal(dedupChunk(chunks[0]!, base, sent).chunk.kind[chunks[0]!.pageIndex.indexOf(5)], PageKind.Raw);
  });
});

describe('delta and compress cores', () => {
  test('delta keeps a page raw when encoding does not pay', () => {
    const baseMemory = randomBytes(PAGE_SIZE * 2);
    const encoder = new DeltaEncoder((_i, index) => Buffer.from(page(baseMemory, index)));
    const chunk = capture({ base: [baseMemory, Buffer.alloc(PAGE_SIZE)], current: [Buffer.concat([randomBytes(PAGE_SIZE), Buffer.from(page(baseMemory, 1)).fill(7, 0, 3)]), Buffer.alloc(PAGE_SIZE)] }, 1, 10)[0]!;
    for (const algorithm of ['xor', 'zstd'] as const) {
      const { chunk: out, counts } = encoder.encode(chunk, algorithm);
      assert.deepEqual(counts, { encoded: 1, kept: 1 });
      assert.equal(out.kind[0], PageKind.Raw);
      assert.equal(out.kind[1], algorithm === 'xor' ? PageKind.Xor : PageKind.ZstdDelta);
      assert.equal(out.bodyRawLength, PAGE_SIZE + out.bodyLength[1]!);
      assert.equal(out.mode.delta, algorithm);
    }
    assert.equal(encoder.encode(chunk, 'none').chunk, chunk);
  });
  test('compress records its mode, passes none through, refuses to compress twice', () => {
    const chunk = capture(smallVm(), 1, 1000)[0]!;
    const c = new ChunkCompressor();
    assert.equal(c.compress(chunk, { compressor: 'none', level: 0 }), chunk);
    const z = c.compress(chunk, { compressor: 'zstd', level: 5 });
    assert.deepEqual(z.mode, { delta: 'none', compressor: 'zstd', level: 5 });
    assert.throws(() => c.compress(z, { compressor: 'lz4', level: 0 }), /already compressed/);
  });

  test("after a switch, compress gives a chunk of another delta the tuner's compression for that delta", async () => {
    // queued at compress when the tuner left xor+zstd-3 for delta=zstd without compression: sent as
    // xor without compression (no one's choice, 40% larger) before compressFor
    const vm = smallVm();
    const xorChunk = pipeline(vm, { delta: 'xor', compressor: 'none', level: 0 }, 1, 1000)[0]!;
    const plainChunk = pipeline(vm, { delta: 'none', compressor: 'none', level: 0 }, 1, 1000)[0]!;
    const config: ModeConfig = { delta: 'zstd', compressor: 'none', level: 0, compressFor: { xor: { compressor: 'zstd', level: 1 } } };
    assert.deepEqual(compressionFor(config, 'xor'), { delta: 'xor', compressor: 'zstd', level: 1 });
    assert.deepEqual(compressionFor(config, 'zstd'), { delta: 'zstd', compressor: 'none', level: 0 });
    assert.deepEqual(compressionFor(config, 'none'), { delta: 'none', compressor: 'none', level: 0 }, 'no entry: the config itself');
    const actor = createCompressActor(1);
    try {
      const ctx = { descriptor: {} as MigrationDescriptor, mode: config, log: createLogger({ stage: 'compress' }) };
      const out = (await actor.handle(xorChunk, ctx)).outputs[0]!;
      assert.deepEqual(out.chunk.mode, { delta: 'xor', compressor: 'zstd', level: 1 });
      assert.equal(out.to, 'wire');
      assert.deepEqual((await actor.handle(plainChunk, ctx)).outputs[0]!.chunk.mode, { delta: 'none', compressor: 'none', level: 0 });
    } finally {
      await actor.close?.();
    }
  });

  test('a config value is checked whole: a bad compressFor is not a mode', () => {
    assert.ok(isModeConfig({ delta: 'zstd', compressor: 'none', level: 0, compressFor: { xor: { compressor: 'lz4', level: 0 } } }));
    assert.ok(!isModeConfig({ delta: 'zstd', compressor: 'none', level: 0, compressFor: { xor: { compressor: 'gzip', level: 0 } } }));
    assert.ok(!isModeConfig({ delta: 'zstd', compressor: 'none', level: 0, compressFor: { rle: { compressor: 'lz4', level: 0 } } }));
    assert.ok(!isModeConfig({ delta: 'zstd', compressor: 'none', level: 0, compressFor: 'lz4' }));
  });

  test('patch compresses in delta, with zstd only: the mode says so, and compress is skipped', () => {
    assert.ok(isMode({ delta: 'patch', compressor: 'zstd', level: 19 }));
    assert.ok(!isMode({ delta: 'patch', compressor: 'none', level: 0 }));
    assert.throws(() => checkMode({ delta: 'patch', compressor: 'lz4', level: 0 }), /delta patch compresses with zstd: give --mode zstd:LEVEL, not lz4/);
    assert.deepEqual(checkMode({ delta: 'patch', compressor: 'zstd', level: 9 }), { delta: 'patch', compressor: 'zstd', level: 9 });
    const vm = smallVm();
    const delta = new DeltaEncoder((image, index) => Buffer.from(page(vm.base[image], index)));
    const raw = capture(vm, 1, 32).find((c) => c.image === 0)!;
    const { chunk: out, counts } = delta.encode(raw, 'patch', 9);
    assert.deepEqual(out.mode, { delta: 'patch', compressor: 'zstd', level: 9 });
    assert.equal(counts.encoded, raw.kind.filter((k) => k === PageKind.Raw).length);
    assert.equal(nextStage('delta', { delta: 'patch', compressor: 'zstd', level: 9 }, out), 'wire');
    assert.equal(nextStage('delta', { delta: 'xor', compressor: 'zstd', level: 9 }, delta.encode(raw, 'xor').chunk), 'compress');
  });

  test("delta times its codec apart from reading base pages, for the tuner's codec scale", () => {
    const vm = smallVm();
    const raw = capture(vm, 1, 32).find((c) => c.image === 0)!;
    // a clock only the reads move: timed apart, the codec took none of it
    let nowMs = 0;
    const reads = new DeltaEncoder((image, index) => ((nowMs += 1000), Buffer.from(page(vm.base[image], index))), () => nowMs);
    for (const [algorithm, level] of [['patch', 19], ['xor', 0], ['zstd', 0]] as const) {
      const before = nowMs;
      const { counts } = reads.encode(raw, algorithm, level);
      assert.ok(nowMs > before, `${algorithm}: base pages were read`);
      assert.equal(counts.codecCpuMs, 0, `${algorithm}: the reads are not the codec's`);
    }
    // the thread's real CPU: patch-19 takes some, and no more than the whole encode
    const timed = new DeltaEncoder((image, index) => Buffer.from(page(vm.base[image], index)), threadCpuMs);
    const start = threadCpuMs()!;
    const { counts } = timed.encode(raw, 'patch', 19);
    assert.ok(counts.codecCpuMs! > 0 && counts.codecCpuMs! <= threadCpuMs()! - start, `codec ${counts.codecCpuMs} ms`);
    // without a clock, nothing is said
    assert.equal(new DeltaEncoder((image, index) => Buffer.from(page(vm.base[image], index))).encode(raw, 'patch', 3).counts.codecCpuMs, undefined);
  });
});

describe('rebuilder', () => {
  for (const delta of DELTA_ALGORITHMS) {
    for (const compressor of COMPRESSORS) {
      if (!isMode({ delta, compressor, level: 3 })) continue;
      test(`delta ${delta}, ${compressor}: rebuilt images equal the current ones`, () => {
        const vm = smallVm();
        const { store, rebuilder } = rebuild(vm, pipeline(vm, { delta, compressor, level: compressor === 'zstd' ? 3 : 0 }, 2));
        assert.deepEqual(store.rebuilt[0], vm.current[0]);
        assert.deepEqual(store.rebuilt[1], vm.current[1]);
        assert.equal(rebuilder.imageDigest(0), digestOfPageHashes(hashIndex(vm.current[0])));
        assert.equal(rebuilder.imageDigest(1), digestOfPageHashes(hashIndex(vm.current[1])));
      });
    }
  }

  test('any order (references before their target), duplicates ignored, complete only when all arrived', () => {
    const vm = smallVm();
    const chunks = pipeline(vm, { delta: 'xor', compressor: 'lz4', level: 0 }, 1, 3).reverse();
    const store = new MemoryStore(vm.base);
    const r = new Rebuilder(store, 'unit', [hashIndex(vm.base[0]), hashIndex(vm.base[1])]);
    let deferred = 0;
    for (const c of chunks) deferred += r.apply(c).pagesDeferred;
    assert.ok(deferred > 0, 'no reference arrived before its target');
    assert.equal(r.complete, false, 'complete before the source said how many slices');
    r.expect(0, chunks.length + 1);
    assert.equal(r.complete, false);
    r.expect(0, chunks.length);
    assert.equal(r.complete, true);
    assert.equal(r.pendingReferences, 0);
    assert.equal(r.apply(chunks[0]!).duplicate, true);
    assert.deepEqual(store.rebuilt, vm.current);
  });

  test('a page that fails its check is refused and not written', () => {
    const vm = smallVm();
    const chunk = pipeline(vm, { delta: 'none', compressor: 'none', level: 0 })[0]!;
    flip(chunk.body, 5);
    const { store } = (() => {
      const store = new MemoryStore(vm.base);
      const r = new Rebuilder(store, 'unit', [hashIndex(vm.base[0]), hashIndex(vm.base[1])]);
      assert.throws(() => r.apply(chunk), (e: Error) => e instanceof VerificationError && /memory page \d+ .* does not match the source's check/.test(e.message));
      return { store };
    })();
    const index = chunk.pageIndex[chunk.kind.indexOf(PageKind.Raw)]!;
    assert.deepEqual(page(store.rebuilt[0], index), page(vm.base[0], index));
  });

  test('patch: one frame per chunk against its base pages; a wrong base or a damaged frame is refused, naming the cause', () => {
    const vm = smallVm();
    const chunks = pipeline(vm, { delta: 'patch', compressor: 'zstd', level: 19 });
    const patched = chunks.filter((c) => c.mode.delta === 'patch');
    assert.ok(patched.length > 0 && patched.every((c) => c.mode.compressor === 'zstd' && c.mode.level === 19 && !c.kind.some((k) => k === PageKind.Xor || k === PageKind.ZstdDelta)));
    const chunk = patched.find((c) => c.image === 0)!;
    const index = chunk.pageIndex[chunk.kind.indexOf(PageKind.Raw)]!;
    // the destination's base differs at one of the chunk's pages: the frame's checksum fails
    const wrongBase: [Buffer, Buffer] = [Buffer.from(vm.base[0]), vm.base[1]];
    flip(page(wrongBase[0], index), 100);
    const wrong = new MemoryStore(wrongBase);
    const r = new Rebuilder(wrong, 'unit', [hashIndex(wrongBase[0]), hashIndex(wrongBase[1])]);
    assert.throws(() => r.apply(chunk), (e: Error) => e instanceof MalformedMessageError && /chunk 0\.\d+\.0: patch: /.test(e.message));
    assert.deepEqual(page(wrong.rebuilt[0], index), page(wrongBase[0], index));
    const damaged = { ...chunk, body: Buffer.from(chunk.body) };
    flip(damaged.body, damaged.body.byteLength >> 1, 0x10);
    const r2 = new Rebuilder(new MemoryStore(vm.base), 'unit', [hashIndex(vm.base[0]), hashIndex(vm.base[1])]);
    assert.throws(() => r2.apply(damaged), MalformedMessageError);
    const r3 = new Rebuilder(new MemoryStore(vm.base), 'unit', [hashIndex(vm.base[0]), hashIndex(vm.base[1])]);
    const applied = r3.apply(chunk);
    assert.equal(applied.pagesWritten + applied.pagesDeferred, chunk.pageIndex.length);
  });

  test('index past the end, another migration: malformed', () => {
    const vm = smallVm();
    const chunk = pipeline(vm, { delta: 'none', compressor: 'none', level: 0 })[0]!;
    const r = new Rebuilder(new MemoryStore(vm.base), 'other', [hashIndex(vm.base[0]), hashIndex(vm.base[1])]);
    assert.throws(() => r.apply(chunk), (e: Error) => e instanceof MalformedMessageError && /for migration unit reached migration other/.test(e.message));
    const r2 = new Rebuilder(new MemoryStore(vm.base), 'unit', [hashIndex(vm.base[0]), hashIndex(vm.base[1])]);
    chunk.pageIndex[0] = PAGES;
    assert.throws(() => r2.apply(chunk), /page index 96 is past the end of the memory image \(96 pages\)/);
  });

  test('an older round never overwrites a newer one', () => {
    const vm = smallVm();
    const round0 = pipeline(vm, { delta: 'none', compressor: 'none', level: 0 });
    const later = smallVm();
    later.base = vm.base;
    later.current = [Buffer.from(vm.current[0]), Buffer.from(vm.current[1])];
    page(later.current[0], 3).fill(0x33);
    const round1 = pipeline(later, { delta: 'none', compressor: 'none', level: 0 }).map((c) => ({ ...c, round: 1 }));
    const store = new MemoryStore(vm.base);
    const r = new Rebuilder(store, 'unit', [hashIndex(vm.base[0]), hashIndex(vm.base[1])]);
    for (const c of round1) r.apply(c);
    for (const c of round0) r.apply(c);
    assert.deepEqual(page(store.rebuilt[0], 3), page(later.current[0], 3));
  });
});
