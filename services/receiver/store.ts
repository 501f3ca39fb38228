/** File-backed PageStore: base images read-only, rebuilt images written at `<out>.partial` until verified. */
import { execFile } from 'node:child_process';
import { closeSync, fsyncSync, openSync, readSync, renameSync, rmSync, writevSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { PAGE_SIZE, type ImageId } from '../../shared/image/pages.js';
import type { PageStore } from './core.js';

const MAX_RUN_PAGES = 256;

export interface ImageFiles {
  base: string;
  out: string;
  bytes: number;
}

export class FilePageStore implements PageStore {
  private readonly baseFds: number[];
  /** open once `ready` resolves */
  private outFds: number[] = [];
  private closed = false;
  /**
   * Resolves once each rebuilt image starts as its base (or rejects naming why it cannot): the copy
   * runs while the link opens, so the source's first pages need not wait for it.
   */
  readonly ready: Promise<void>;
  /** told of every page written (a resumer feeding QEMU tracks the memory pages it must send) */
  onWrite: ((image: ImageId, index: number) => void) | undefined;

  /**
   * Starts each rebuilt image as a copy of its base: a reflink where the filesystem has them, else a
   * sparse copy (the base's holes stay holes; copy_file_range writes them out in full on ext4).
   */
  constructor(private readonly images: [ImageFiles, ImageFiles]) {
    this.baseFds = images.map((i) => openSync(i.base, 'r'));
    this.ready = Promise.all(images.map((i) => copySparse(i.base, partial(i.out)))).then(() => {
      if (this.closed) return;
      this.outFds = images.map((i) => openSync(partial(i.out), 'r+'));
      // the copy's data goes to disk now, while pages cross: left dirty, a flush at the stop
      // (ours, or QEMU's when its incoming migration completes) waited for it in the downtime
      void syncFiles(this.partialPaths).catch(() => undefined);
    });
    // heard by whoever awaits it
    this.ready.catch(() => undefined);
  }

  private outFd(image: ImageId): number {
    const fd = this.outFds[image];
    if (fd === undefined) throw new Error('a rebuilt image was used before the copy of its base was done');
    return fd;
  }

  pageCount(image: ImageId): number {
    return this.images[image].bytes / PAGE_SIZE;
  }

  private read(fd: number, index: number): Uint8Array {
    const page = Buffer.allocUnsafe(PAGE_SIZE);
    if (readSync(fd, page, 0, PAGE_SIZE, index * PAGE_SIZE) !== PAGE_SIZE) throw new RangeError(`page ${index} is past the end`);
    return page;
  }

  readBase(image: ImageId, index: number): Uint8Array {
    return this.read(this.baseFds[image]!, index);
  }

  readRebuilt(image: ImageId, index: number): Uint8Array {
    this.flush();
    return this.read(this.outFd(image), index);
  }

  /** Consecutive pages are gathered and written with one writev: chunks come in page order. */
  private run: { image: ImageId; first: number; pages: Uint8Array[] } | undefined;

  writeRebuilt(image: ImageId, index: number, page: Uint8Array): void {
    this.onWrite?.(image, index);
    const run = this.run;
    if (run && run.image === image && run.first + run.pages.length === index && run.pages.length < MAX_RUN_PAGES) {
      run.pages.push(page);
      return;
    }
    this.flush();
    this.run = { image, first: index, pages: [page] };
  }

  /** Writes the pages gathered so far: another reader of the rebuilt files sees them then. */
  flush(): void {
    const run = this.run;
    if (!run) return;
    this.run = undefined;
    let position = run.first * PAGE_SIZE;
    let pages = run.pages;
    while (pages.length > 0) {
      const written = writevSync(this.outFd(run.image), pages, position);
      position += written;
      // a short write: carry on from where it stopped (whole pages only in practice)
      const whole = Math.floor(written / PAGE_SIZE);
      pages = pages.slice(whole);
      if (written % PAGE_SIZE !== 0) throw new Error(`short write of a page at byte ${position}`);
    }
  }

  /** Paths of the rebuilt images while they are unverified. */
  get partialPaths(): string[] {
    return this.images.map((i) => partial(i.out));
  }

  /**
   * Writes what is gathered and closes the files; `sync: false` leaves the flush to disk for later
   * (`syncPublished`): a VM waiting to resume reads them through the page cache, and flushing a
   * rebuilt gigabyte took 664 ms of a handoff's downtime.
   */
  close(options: { sync?: boolean } = {}): void {
    this.closed = true;
    this.flush();
    for (const fd of this.outFds) {
      if (options.sync !== false) fsyncSync(fd);
      closeSync(fd);
    }
    for (const fd of this.baseFds) closeSync(fd);
  }

  /** The published images flushed to disk (after a `close({ sync: false })`). */
  syncPublished(): Promise<void> {
    return syncFiles(this.images.map((i) => i.out));
  }

  /** After verification: the images take their final names. */
  publish(): void {
    for (const i of this.images) renameSync(partial(i.out), i.out);
  }

  /** After a failure: no image that could be mistaken for a good one is left behind. */
  discard(): void {
    for (const i of this.images) rmSync(partial(i.out), { force: true });
  }
}

function copySparse(from: string, to: string): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('cp', ['--sparse=always', '--reflink=auto', '--', from, to], (err, _stdout, stderr) => {
      if (err) reject(new Error(`cannot copy the base ${from} to ${to}: ${stderr.trim() || err.message}`));
      else resolve();
    });
  });
}

/** Each file's data flushed to disk, through a descriptor of its own (the store's stay free to close). */
async function syncFiles(paths: readonly string[]): Promise<void> {
  for (const path of paths) {
    const fh = await open(path, 'r');
    try {
      await fh.datasync();
    } finally {
      await fh.close();
    }
  }
}

function partial(path: string): string {
  return `${path}.partial`;
}
