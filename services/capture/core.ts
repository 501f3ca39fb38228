/**
 * Capture's pure core: find the pages of an image block that differ from the reference (the base in
 * round 0) and batch them into chunks, one slice per dedup partition.
 */
import { PageKind, type Chunk } from '../../shared/chunk.js';
import { CHECK_BYTES, PAGE_SIZE, STRONG_HASH_BYTES, pageCheck, strongHash, type ImageId } from '../../shared/pages.js';

/**
 * Indices (relative to the block) of pages in `current` that differ from `reference`.
 * Bytes are compared, not hashes: a hash collision here would silently drop a changed page.
 */
export function dirtyPagesOf(current: Uint8Array, reference: Uint8Array): number[] {
  if (current.byteLength !== reference.byteLength || current.byteLength % PAGE_SIZE !== 0) {
    throw new RangeError(`block sizes ${current.byteLength} and ${reference.byteLength} differ or are not whole pages`);
  }
  const cur = Buffer.from(current.buffer, current.byteOffset, current.byteLength);
  const ref = Buffer.from(reference.buffer, reference.byteOffset, reference.byteLength);
  const dirty: number[] = [];
  const pages = current.byteLength / PAGE_SIZE;
  for (let p = 0; p < pages; p++) {
    const start = p * PAGE_SIZE;
    if (cur.compare(ref, start, start + PAGE_SIZE, start, start + PAGE_SIZE) !== 0) dirty.push(p);
  }
  return dirty;
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
  add(pageIndex: number, page: Uint8Array): boolean {
    this.pages.push(Buffer.from(page));
    this.indices.push(pageIndex);
    return this.pages.length >= this.chunkPages;
  }

  /** Builds the `parts` slices of the pending pages (empty slices too: the receiver counts them). */
  take(): Chunk[] {
    const { parts } = this.ctx;
    const hashes = this.pages.map((page) => strongHash(page));
    const members: number[][] = Array.from({ length: parts }, () => []);
    hashes.forEach((h, i) => members[partitionOf(h, parts)]!.push(i));
    const seq = this.seq++;
    const slices = members.map((which, part) => this.slice(seq, part, which, hashes));
    this.pages.length = 0;
    this.indices.length = 0;
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
