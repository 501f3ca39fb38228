/**
 * The base image's hash index: a 16-byte strong hash per page, built once per base image and cached
 * beside it (or in HANDOFF_CACHE_DIR when that folder is read-only; when neither can be written, not
 * cached, with a warning naming the path and the uid). The base's content hash is its
 * image digest (SHA-256 of that index), so both cloudlets name a base the same way without shipping it.
 */
import { createHash } from 'node:crypto';
import { constants } from 'node:fs';
import { access, mkdir, open, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { BadImageError } from '../model/errors.js';
import { createLogger } from '../telemetry/log.js';
import { PAGE_SIZE, STRONG_HASH_BYTES, digestOfPageHashes, strongHash } from './pages.js';

export interface BaseIndex {
  path: string;
  bytes: number;
  pages: number;
  /** the image digest (see pages.ts): hex SHA-256 of `hashes` */
  contentHash: string;
  /** STRONG_HASH_BYTES per page */
  hashes: Uint8Array;
}

const MAGIC = 'HIDX1';
const log = createLogger({ stage: 'base-index' });
const READ_BLOCK = 4 * 1024 * 1024;

/** Sizes must be whole pages; names the file and the cause otherwise. */
export async function checkImage(path: string, what: string): Promise<number> {
  let size: number;
  try {
    const s = await stat(path);
    if (!s.isFile()) throw new BadImageError(`${what} ${path} is not a regular file`);
    size = s.size;
  } catch (err) {
    if (err instanceof BadImageError) throw err;
    throw new BadImageError(`${what} ${path} cannot be read: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  if (size === 0) throw new BadImageError(`${what} ${path} is empty`);
  if (size % PAGE_SIZE !== 0) throw new BadImageError(`${what} ${path} is ${size} bytes, not a multiple of ${PAGE_SIZE} (truncated?)`);
  return size;
}

async function cachePathFor(path: string): Promise<string> {
  const beside = `${path}.hidx`;
  try {
    await access(dirname(path), constants.W_OK);
    return beside;
  } catch {
    const dir = process.env.HANDOFF_CACHE_DIR ?? join(homedir(), '.cache', 'cloudlet-handoff');
    return join(dir, `${basename(path)}-${createHash('sha256').update(path).digest('hex').slice(0, 16)}.hidx`);
  }
}

interface CacheHeader {
  magic: string;
  size: number;
  mtimeMs: number;
  contentHash: string;
}

/**
 * Loads the cached index when the file is unchanged (size and mtime: a base folder copied to another
 * cloudlet with its times kept, `cp -a` or `rsync -a`, reuses its index), else builds and caches it.
 */
export async function loadBaseIndex(path: string): Promise<BaseIndex> {
  const bytes = await checkImage(path, 'base image');
  const s = await stat(path);
  const cachePath = await cachePathFor(path);
  const cached = await readCache(cachePath, s.size, s.mtimeMs);
  if (cached) return { path, bytes, pages: bytes / PAGE_SIZE, ...cached };
  const hashes = await hashPages(path, bytes);
  const contentHash = digestOfPageHashes(hashes);
  const header: CacheHeader = { magic: MAGIC, size: s.size, mtimeMs: s.mtimeMs, contentHash };
  const headerBytes = Buffer.from(`${JSON.stringify(header)}\n`);
  const tmp = `${cachePath}.${process.pid}.tmp`;
  try {
    await mkdir(dirname(cachePath), { recursive: true });
    await writeFile(tmp, Buffer.concat([headerBytes, hashes]));
    await rename(tmp, cachePath);
  } catch (err) {
    // an index in memory serves as well; only the next start pays for indexing again
    log.warn('base index not cached: its folder cannot be written (set HANDOFF_CACHE_DIR, or make the base folder writable by this uid)', {
      base: path,
      cache: cachePath,
      uid: process.getuid?.(),
      cause: (err as NodeJS.ErrnoException).code ?? String(err),
    });
  }
  return { path, bytes, pages: bytes / PAGE_SIZE, contentHash, hashes };
}

async function readCache(cachePath: string, size: number, mtimeMs: number): Promise<{ contentHash: string; hashes: Uint8Array } | undefined> {
  let data: Buffer;
  try {
    data = await readFile(cachePath);
  } catch {
    return undefined;
  }
  const nl = data.indexOf(10);
  if (nl < 0) return undefined;
  try {
    const header = JSON.parse(data.subarray(0, nl).toString('utf8')) as CacheHeader;
    const hashes = data.subarray(nl + 1);
    if (header.magic !== MAGIC || header.size !== size || header.mtimeMs !== mtimeMs) return undefined;
    if (hashes.byteLength !== (size / PAGE_SIZE) * STRONG_HASH_BYTES) return undefined;
    // the stamp says unchanged; the content hash must still match what is cached
    if (digestOfPageHashes(hashes) !== header.contentHash) return undefined;
    return { contentHash: header.contentHash, hashes };
  } catch {
    return undefined;
  }
}

/** Strong hash of every page of an image file. */
export async function hashPages(path: string, bytes: number): Promise<Buffer> {
  const hashes = Buffer.alloc((bytes / PAGE_SIZE) * STRONG_HASH_BYTES);
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(READ_BLOCK);
    let page = 0;
    for (let offset = 0; offset < bytes; ) {
      const { bytesRead } = await fh.read(buf, 0, Math.min(READ_BLOCK, bytes - offset), offset);
      if (bytesRead === 0 || bytesRead % PAGE_SIZE !== 0) throw new BadImageError(`base image ${path} changed while it was read`);
      for (let at = 0; at < bytesRead; at += PAGE_SIZE) {
        strongHash(buf.subarray(at, at + PAGE_SIZE)).copy(hashes, page * STRONG_HASH_BYTES);
        page++;
      }
      offset += bytesRead;
    }
  } finally {
    await fh.close();
  }
  return hashes;
}

/** The image digest of any image file (tests and tools; the pipeline gets it without a second read). */
export async function imageDigest(path: string): Promise<string> {
  return digestOfPageHashes(await hashPages(path, await checkImage(path, 'image')));
}
