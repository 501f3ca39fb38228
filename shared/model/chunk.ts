/**
 * The chunk: a batch of pages of one image, as it flows capture -> dedup -> delta -> compress -> wire.
 * Columns (typed arrays) rather than objects per page: cheap to build, encode and ship.
 */
import type { ImageId } from '../image/pages.js';
import type { Mode } from './mode.js';

/** What a page's entry holds. */
export const PageKind = {
  /** the page itself, 4096 bytes of body */
  Raw: 0,
  /** all zeros, no body */
  Zero: 1,
  /** equal to base image `refImage` page `refIndex`, no body */
  Base: 2,
  /** equal to a page already sent in this migration (at `refImage`/`refIndex` of the rebuilt image), no body */
  Sent: 3,
  /** xor with the base page at the same index, zero runs squeezed (see services/delta/xor.ts) */
  Xor: 4,
  /** zstd with the base page at the same index as dictionary */
  ZstdDelta: 5,
} as const;
export type PageKind = (typeof PageKind)[keyof typeof PageKind];
export const PAGE_KIND_COUNT = 6;

export interface Chunk {
  migrationId: string;
  /** pre-copy round: 0 = against base; later rounds against the round before */
  round: number;
  /** capture's chunk number within the migration and round */
  seq: number;
  /** dedup partition this slice of capture chunk `seq` belongs to, of `parts` */
  part: number;
  parts: number;
  image: ImageId;
  /** what was applied so far: delta algorithm tried, compressor and level of `body` */
  mode: Mode;
  pageIndex: Uint32Array;
  kind: Uint8Array;
  refImage: Uint8Array;
  refIndex: Uint32Array;
  /** length of each page's body inside the uncompressed body */
  bodyLength: Uint32Array;
  /** 8 bytes per page: xxh64 (little-endian) of the page as the source read it */
  check: Uint8Array;
  /** 16 bytes per page: strong hash; only between capture and dedup, dropped after */
  strongHash?: Uint8Array;
  /** concatenated page bodies, compressed with mode.compressor when that is not 'none' */
  body: Uint8Array;
  /** sum of bodyLength: the body's size before compression */
  bodyRawLength: number;
}

/** Stable key of a chunk slice within its migration and round. */
export function chunkKey(chunk: Pick<Chunk, 'round' | 'seq' | 'part'>): string {
  return `${chunk.round}.${chunk.seq}.${chunk.part}`;
}
