/** Page geometry and page-level hashing shared by every stage. */
import { createHash, hash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { xxh64 } from '@node-rs/xxhash';

export const PAGE_SIZE = 4096;
/** Strong content hash length: 128 bits of SHA-256, so a collision cannot forge a page in practice. */
export const STRONG_HASH_BYTES = 16;
/** Per-page end-to-end check: xxh64 of the page as the source saw it (catches pipeline bugs, not attacks). */
export const CHECK_BYTES = 8;

export const IMAGES = ['memory', 'disk'] as const;
/** Index into IMAGES: 0 = memory, 1 = disk. */
export type ImageId = 0 | 1;

export function strongHash(page: Uint8Array): Buffer {
  return hash('sha256', page, 'buffer').subarray(0, STRONG_HASH_BYTES);
}

export function pageCheck(page: Uint8Array): bigint {
  return xxh64(page);
}

export const ZERO_PAGE: Buffer = Buffer.alloc(PAGE_SIZE);
export const ZERO_PAGE_HASH: Buffer = strongHash(ZERO_PAGE);

/**
 * An image's digest: SHA-256 over its pages' strong hashes in order (a hash list). Capture gets it
 * from the hashes it computes anyway, and the destination from its base index plus the pages it
 * wrote, so neither reads a whole image a second time. It names a base image too.
 */
export function newImageDigest(): ReturnType<typeof createHash> {
  return createHash('sha256');
}

export function digestOfPageHashes(hashes: Uint8Array): string {
  return newImageDigest().update(hashes).digest('hex');
}

/** Plain SHA-256 (hex) of a whole file: tests and tools compare files with it, independently of the pipeline. */
export async function hashImageFile(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const data of createReadStream(path, { highWaterMark: 4 * 1024 * 1024 })) h.update(data as Buffer);
  return h.digest('hex');
}
