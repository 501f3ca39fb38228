/**
 * Capture's pure core: find the pages of an image block that differ from the reference (the base in
 * round 0) and batch them into chunks, one slice per dedup partition.
 */
import { PageKind, type Chunk } from '../../shared/model/chunk.js';
import { CHECK_BYTES, PAGE_SIZE, STRONG_HASH_BYTES, pageCheck, strongHash, type ImageId } from '../../shared/image/pages.js';

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
  if (record) recordGroups(block, firstIndex, record);
  return dirty;
}

/** Pages per group: later rounds first compare one xxh64 per 64 KiB, then the pages of changed groups. */
export const GROUP_PAGES = 16;

function recordGroups(block: Uint8Array, firstIndex: number, record: PageRecord): void {
  if (firstIndex % GROUP_PAGES !== 0) throw new RangeError(`block starts at page ${firstIndex}, not at a group of ${GROUP_PAGES} pages`);
  const pages = block.byteLength / PAGE_SIZE;
  for (let p = 0; p < pages; p += GROUP_PAGES) {
    record.groups[(firstIndex + p) / GROUP_PAGES] = pageCheck(block.subarray(p * PAGE_SIZE, Math.min(pages, p + GROUP_PAGES) * PAGE_SIZE));
  }
}

/**
 * Every page's strong hash and xxh64 as a round read them, and one xxh64 per group of pages: what
 * the next round compares with.
 */
export interface PageRecord {
  strong: Buffer;
  checks: BigUint64Array;
  groups: BigUint64Array;
}

export function newPageRecord(pages: number): PageRecord {
  return { strong: Buffer.alloc(pages * STRONG_HASH_BYTES), checks: new BigUint64Array(pages), groups: new BigUint64Array(Math.ceil(pages / GROUP_PAGES)) };
}

/**
 * Later rounds: the pages of `block` changed since the round before. A group whose xxh64 is
 * unchanged is skipped (one hash per group keeps the final round short, and it runs while the VM
 * is stopped); a changed group is copied first and everything after is computed on the copy,
 * because `block` may be the guest's live memory: the group hash, page checks and strong hashes in
 * `record` then describe exactly the bytes that are sent, whatever the guest writes meanwhile.
 * `record`'s strong hashes give the image digest without hashing every page again.
 */
export function changedPagesOf(block: Uint8Array, firstIndex: number, record: PageRecord): DirtyPage[] {
  if (block.byteLength % PAGE_SIZE !== 0) throw new RangeError(`block of ${block.byteLength} bytes is not whole pages`);
  if (firstIndex % GROUP_PAGES !== 0) throw new RangeError(`block starts at page ${firstIndex}, not at a group of ${GROUP_PAGES} pages`);
  const changed: DirtyPage[] = [];
  const pages = block.byteLength / PAGE_SIZE;
  for (let g = 0; g < pages; g += GROUP_PAGES) {
    const groupIndex = (firstIndex + g) / GROUP_PAGES;
    const live = block.subarray(g * PAGE_SIZE, Math.min(pages, g + GROUP_PAGES) * PAGE_SIZE);
    if (pageCheck(live) === record.groups[groupIndex]) continue;
    const group = Buffer.from(live);
    record.groups[groupIndex] = pageCheck(group);
    for (let p = 0; p < group.byteLength / PAGE_SIZE; p++) {
      const page = group.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
      const index = firstIndex + g + p;
      const check = pageCheck(page);
      if (check === record.checks[index]) continue;
      record.checks[index] = check;
      const hash = strongHash(page);
      hash.copy(record.strong, index * STRONG_HASH_BYTES);
      changed.push({ index, page, hash });
    }
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
