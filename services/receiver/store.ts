/** File-backed PageStore: base images read-only, rebuilt images written at `<out>.partial` until verified. */
import { closeSync, copyFileSync, fsyncSync, openSync, readSync, renameSync, rmSync, writeSync } from 'node:fs';
import { PAGE_SIZE, type ImageId } from '../../shared/pages.js';
import type { PageStore } from './core.js';

export interface ImageFiles {
  base: string;
  out: string;
  bytes: number;
}

export class FilePageStore implements PageStore {
  private readonly baseFds: number[];
  private readonly outFds: number[];

  /** Starts each rebuilt image as a copy of its base (copy_file_range/reflink where the filesystem can). */
  constructor(private readonly images: [ImageFiles, ImageFiles]) {
    this.baseFds = images.map((i) => openSync(i.base, 'r'));
    this.outFds = images.map((i) => {
      copyFileSync(i.base, partial(i.out));
      return openSync(partial(i.out), 'r+');
    });
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
    return this.read(this.outFds[image]!, index);
  }

  writeRebuilt(image: ImageId, index: number, page: Uint8Array): void {
    writeSync(this.outFds[image]!, page, 0, PAGE_SIZE, index * PAGE_SIZE);
  }

  /** Paths of the rebuilt images while they are unverified. */
  get partialPaths(): string[] {
    return this.images.map((i) => partial(i.out));
  }

  close(): void {
    for (const fd of this.outFds) {
      fsyncSync(fd);
      closeSync(fd);
    }
    for (const fd of this.baseFds) closeSync(fd);
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

function partial(path: string): string {
  return `${path}.partial`;
}
