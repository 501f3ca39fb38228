/**
 * Capture's pure core: find the pages of an image block that differ from the reference (the base in
 * round 0) and batch them into chunks, one slice per dedup partition.
 */
import { PageKind, type Chunk } from '../../shared/chunk.js';
import { CHECK_BYTES, PAGE_SIZE, STRONG_HASH_BYTES, pageCheck, strongHash, type ImageId } from '../../shared/pages.js';

export interface DirtyPage {
  /** page index within the image */
  index: number;
  /** view into the block: copy before the block buffer is reused */
  page: Uint8Array;
  hash: Buffer;
}

/**
 * Pages of `block` (starting at page `firstIndex`) whose strong hash differs from the reference
 * index (the base's in round 0, the previous round's later). 128-bit SHA-256: a collision that
 * would hide a changed page is not a practical event, and the hash is needed for dedup anyway.
 * Every page's hash goes into `digest` in order: the image digest, without a second pass.
 */
export function dirtyPagesOf(
  block: Uint8Array,
  firstIndex: number,
  referenceHashes: Uint8Array,
  digest?: { update(data: Uint8Array): unknown },
  /** where to keep every page's hash and xxh64 (the reference of the next round of a live handoff) */
  record?: PageRecord,
): DirtyPage[] {
  if (block.byteLength % PAGE_SIZE !== 0) throw new RangeError(`block of ${block.byteLength} bytes is not whole pages`);
  const ref = Buffer.from(referenceHashes.buffer, referenceHashes.byteOffset, referenceHashes.byteLength);
  const dirty: DirtyPage[] = [];
  const pages = block.byteLength / PAGE_SIZE;
  for (let p = 0; p < pages; p++) {
    const page = block.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
    const hash = strongHash(page);
    digest?.update(hash);
    const index = firstIndex + p;
    if (record) {
      hash.copy(record.strong, index * STRONG_HASH_BYTES);
      record.checks[index] = pageCheck(page);
    }
    const at = index * STRONG_HASH_BYTES;
    if (at + STRONG_HASH_BYTES > ref.byteLength || hash.compare(ref, at, at + STRONG_HASH_BYTES) !== 0) dirty.push({ index, page, hash });
  }
  return dirty;
}

/** Every page's strong hash and xxh64 as a round read them: what the next round compares with. */
export interface PageRecord {
  strong: Buffer;
  checks: BigUint64Array;
}

export function newPageRecord(pages: number): PageRecord {
  return { strong: Buffer.alloc(pages * STRONG_HASH_BYTES), checks: new BigUint64Array(pages) };
}

/**
 * Later rounds: the pages of `block` changed since the round before, found by xxh64 (~10 GB/s),
 * with the strong hash computed only for those; `record` is brought up to date in place, so that
 * its strong hashes give the image digest without hashing every page again (the final round
 * runs while the VM is stopped).
 */
export function changedPagesOf(block: Uint8Array, firstIndex: number, record: PageRecord): DirtyPage[] {
  if (block.byteLength % PAGE_SIZE !== 0) throw new RangeError(`block of ${block.byteLength} bytes is not whole pages`);
  const changed: DirtyPage[] = [];
  const pages = block.byteLength / PAGE_SIZE;
  for (let p = 0; p < pages; p++) {
    const page = block.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
    const index = firstIndex + p;
    const check = pageCheck(page);
    if (check === record.checks[index]) continue;
    record.checks[index] = check;
    const hash = strongHash(page);
    hash.copy(record.strong, index * STRONG_HASH_BYTES);
    changed.push({ index, page, hash });
  }
  return changed;
}

/** Dedup partition of a page: the strong hash's first byte, so equal pages meet in one dedup instance. */
export function partitionOf(hash: Uint8Array, parts: number): number {
  return hash[0]! % parts;
}

export interface ChunkContext {
  migrationId: string;
  round: number;
  image: ImageId;
  parts: number;
}

/** Accumulates dirty pages; `take()` hands back the slices of one capture chunk. */
export class ChunkBuilder {
  private readonly pages: Buffer[] = [];
  private readonly indices: number[] = [];
  private readonly hashes: Buffer[] = [];
  private seq: number;

  constructor(
    private readonly ctx: ChunkContext,
    readonly chunkPages: number,
    firstSeq = 0,
  ) {
    if (chunkPages < 1) throw new RangeError('chunkPages must be at least 1');
    this.seq = firstSeq;
  }

  get nextSeq(): number {
    return this.seq;
  }

  get pending(): number {
    return this.pages.length;
  }

  /** Adds a page (copied: the caller's read buffer is reused). Returns true when a chunk is full. */
  add({ index, page, hash }: DirtyPage): boolean {
    this.pages.push(Buffer.from(page));
    this.indices.push(index);
    this.hashes.push(hash);
    return this.pages.length >= this.chunkPages;
  }

  /** Builds the `parts` slices of the pending pages (empty slices too: the receiver counts them). */
  take(): Chunk[] {
    const { parts } = this.ctx;
    const hashes = this.hashes;
    const members: number[][] = Array.from({ length: parts }, () => []);
    hashes.forEach((h, i) => members[partitionOf(h, parts)]!.push(i));
    const seq = this.seq++;
    const slices = members.map((which, part) => this.slice(seq, part, which, hashes));
    this.pages.length = 0;
    this.indices.length = 0;
    this.hashes.length = 0;
    return slices;
  }

  private slice(seq: number, part: number, which: number[], hashes: Buffer[]): Chunk {
    const n = which.length;
    const pageIndex = new Uint32Array(n);
    const check = Buffer.alloc(n * CHECK_BYTES);
    const hash = Buffer.alloc(n * STRONG_HASH_BYTES);
    const body = Buffer.alloc(n * PAGE_SIZE);
    which.forEach((i, j) => {
      const page = this.pages[i]!;
      pageIndex[j] = this.indices[i]!;
      check.writeBigUInt64LE(pageCheck(page), j * CHECK_BYTES);
      hashes[i]!.copy(hash, j * STRONG_HASH_BYTES);
      page.copy(body, j * PAGE_SIZE);
    });
    return {
      migrationId: this.ctx.migrationId,
      round: this.ctx.round,
      seq,
      part,
      parts: this.ctx.parts,
      image: this.ctx.image,
      mode: { delta: 'none', compressor: 'none', level: 0 },
      pageIndex,
      kind: new Uint8Array(n).fill(PageKind.Raw),
      refImage: new Uint8Array(n),
      refIndex: new Uint32Array(n),
      bodyLength: new Uint32Array(n).fill(PAGE_SIZE),
      check,
      strongHash: hash,
      body,
      bodyRawLength: n * PAGE_SIZE,
    };
  }
}
