/**
 * Dedup's pure core: replace pages by references where the destination can find the content
 * itself: zero pages, pages equal to any base page (memory or disk), pages already sent.
 * References are by location; the lookup is by 128-bit strong hash, so no collision can forge one.
 */
import { PageKind, type Chunk } from '../../shared/model/chunk.js';
import { PAGE_SIZE, STRONG_HASH_BYTES, ZERO_PAGE_HASH, type ImageId } from '../../shared/image/pages.js';

export interface PageLocation {
  image: ImageId;
  index: number;
}

/** Strong hash -> location, packed into one number to keep millions of entries cheap. */
export class HashLocationMap {
  private readonly map = new Map<string, number>();

  static key(hash: Uint8Array): string {
    return Buffer.from(hash.buffer, hash.byteOffset, STRONG_HASH_BYTES).toString('latin1');
  }

  get size(): number {
    return this.map.size;
  }

  get(hash: Uint8Array): PageLocation | undefined {
    const packed = this.map.get(HashLocationMap.key(hash));
    if (packed === undefined) return undefined;
    return { image: (packed >= 2 ** 32 ? 1 : 0) as ImageId, index: packed % 2 ** 32 };
  }

  /** Keeps the first location seen for a hash. Returns the location now stored. */
  setIfAbsent(hash: Uint8Array, location: PageLocation): PageLocation {
    const key = HashLocationMap.key(hash);
    const packed = this.map.get(key);
    if (packed !== undefined) return { image: (packed >= 2 ** 32 ? 1 : 0) as ImageId, index: packed % 2 ** 32 };
    this.map.set(key, location.image * 2 ** 32 + location.index);
    return location;
  }
}

/** Loads a base index (concatenated 16-byte page hashes) into the map, first occurrence wins. */
export function addBaseIndex(map: HashLocationMap, image: ImageId, hashes: Uint8Array): void {
  const pages = hashes.byteLength / STRONG_HASH_BYTES;
  for (let i = 0; i < pages; i++) {
    const h = hashes.subarray(i * STRONG_HASH_BYTES, (i + 1) * STRONG_HASH_BYTES);
    if (!Buffer.from(h.buffer, h.byteOffset, STRONG_HASH_BYTES).equals(ZERO_PAGE_HASH)) map.setIfAbsent(h, { image, index: i });
  }
}

export interface DedupCounts {
  zero: number;
  base: number;
  sent: number;
  raw: number;
}

/**
 * Returns the chunk with references in place of known pages; `sent` learns the pages that go out in
 * full. Idempotent under redelivery: a page that is itself the first occurrence stays in full.
 */
export function dedupChunk(chunk: Chunk, base: HashLocationMap, sent: HashLocationMap): { chunk: Chunk; counts: DedupCounts } {
  const hashes = chunk.strongHash;
  if (!hashes) throw new Error(`chunk ${chunk.seq}.${chunk.part} reached dedup without strong hashes`);
  if (chunk.mode.compressor !== 'none' || chunk.mode.delta !== 'none') throw new Error('dedup takes raw chunks only');
  const n = chunk.pageIndex.length;
  const kind = new Uint8Array(n);
  const refImage = new Uint8Array(n);
  const refIndex = new Uint32Array(n);
  const bodyLength = new Uint32Array(n);
  const keep: number[] = [];
  const counts: DedupCounts = { zero: 0, base: 0, sent: 0, raw: 0 };
  for (let i = 0; i < n; i++) {
    const h = hashes.subarray(i * STRONG_HASH_BYTES, (i + 1) * STRONG_HASH_BYTES);
    const here: PageLocation = { image: chunk.image, index: chunk.pageIndex[i]! };
    if (Buffer.from(h.buffer, h.byteOffset, STRONG_HASH_BYTES).equals(ZERO_PAGE_HASH)) {
      kind[i] = PageKind.Zero;
      counts.zero++;
      continue;
    }
    const inBase = base.get(h);
    if (inBase) {
      kind[i] = PageKind.Base;
      refImage[i] = inBase.image;
      refIndex[i] = inBase.index;
      counts.base++;
      continue;
    }
    const first = sent.setIfAbsent(h, here);
    if (first.image !== here.image || first.index !== here.index) {
      kind[i] = PageKind.Sent;
      refImage[i] = first.image;
      refIndex[i] = first.index;
      counts.sent++;
      continue;
    }
    kind[i] = PageKind.Raw;
    bodyLength[i] = PAGE_SIZE;
    keep.push(i);
    counts.raw++;
  }
  const body = Buffer.alloc(keep.length * PAGE_SIZE);
  keep.forEach((i, j) => body.set(chunk.body.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), j * PAGE_SIZE));
  const { strongHash: _dropped, ...rest } = chunk;
  return {
    chunk: { ...rest, kind, refImage, refIndex, bodyLength, body, bodyRawLength: body.byteLength },
    counts,
  };
}
