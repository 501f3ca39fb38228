/**
 * Read-only shared mappings of a running VM's image files (mmap, through @riaskov/mmap-io): later
 * rounds hash the guest's memory where it lies instead of copying it through read() first, which
 * matters because the final round is downtime. Where the addon cannot load (no binary for this
 * Node) or a file cannot be mapped, rounds read the file instead.
 */
import { closeSync, openSync } from 'node:fs';
import type { Logger } from '../../shared/telemetry/log.js';

/** What is used of the addon (its CommonJS export reaches ESM as `default`, typed differently) */
interface MmapIo {
  map(size: number, protection: number, flags: number, fd: number, offset?: number, advise?: number): Buffer;
  readonly PROT_READ: number;
  readonly MAP_SHARED: number;
  readonly MADV_NORMAL: number;
}

let loaded: Promise<MmapIo | undefined> | undefined;
let reason = '';

function loadMmap(): Promise<MmapIo | undefined> {
  return (loaded ??= import('@riaskov/mmap-io').then(
    (m) => m.default as unknown as MmapIo,
    (err: unknown) => {
      reason = (err as Error).message;
      return undefined;
    },
  ));
}

/** A shared read-only view of `bytes` bytes of `path`, or undefined (the caller reads the file). */
export async function mapImage(path: string, bytes: number, log: Logger): Promise<Buffer | undefined> {
  const mmap = await loadMmap();
  if (!mmap || bytes <= 0) {
    if (!mmap) log.debug('no mmap: rounds read the images', { reason });
    return undefined;
  }
  const fd = openSync(path, 'r');
  try {
    // the mapping outlives the descriptor; it is unmapped when the buffer is collected
    return mmap.map(bytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0, mmap.MADV_NORMAL);
  } catch (err) {
    log.warn('cannot map image: rounds read it', { path, reason: (err as Error).message });
    return undefined;
  } finally {
    closeSync(fd);
  }
}
