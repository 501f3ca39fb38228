/**
 * A VM's RAM as one flat image file: the RAM blocks of the migration stream's MEM_SIZE list,
 * concatenated in that order, each at a page-aligned offset. The writer places the stream's page
 * records at their offsets as they arrive; zero pages stay holes, so the file is sparse. The reader
 * gives the non-zero pages back as page records, for a stream rebuilt from the image.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { PAGE_SIZE, ZERO_PAGE } from '../image/pages.js';
import type { MigrationRecord, RamBlockInfo } from './migration-stream.js';

export interface RamBlockPlacement {
  idstr: string;
  bytes: number;
  /** where the block starts in the image: a multiple of PAGE_SIZE */
  offset: number;
}

export interface RamLayout {
  blocks: RamBlockPlacement[];
  /** the image's size: the end of the last block, rounded up to a whole page */
  bytes: number;
}

function alignUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** The blocks of a MEM_SIZE list, each placed after the previous one at the next page boundary. */
export function ramLayout(blocks: readonly RamBlockInfo[]): RamLayout {
  const placed: RamBlockPlacement[] = [];
  let at = 0;
  for (const b of blocks) {
    placed.push({ idstr: b.idstr, bytes: b.lengthBytes, offset: at });
    at = alignUp(at + b.lengthBytes, PAGE_SIZE);
  }
  return { blocks: placed, bytes: at };
}

/** Pages to gather into one write when the stream sends them in order (it does in its first round). */
const MAX_RUN_BYTES = 1 << 20;

/**
 * Writes a migration stream's RAM records into a flat image. Only the pages it holds are kept in
 * memory (at most one run of contiguous pages), never the stream.
 */
export class RamImageWriter {
  private layout: RamLayout | undefined;
  private readonly offsets = new Map<string, number>();
  /** one bit per image page: written with data, so a later zero page must overwrite it */
  private written = new Uint8Array(0);
  private run: { at: number; parts: Buffer[]; bytes: number } | undefined;
  pages = 0;
  zeroPages = 0;

  private constructor(private readonly file: FileHandle, readonly path: string) {}

  static async create(path: string): Promise<RamImageWriter> {
    return new RamImageWriter(await open(path, 'wx'), path);
  }

  get placement(): RamLayout | undefined {
    return this.layout;
  }

  /** Takes a record of the stream; RAM records are written, others ignored. */
  async record(r: MigrationRecord): Promise<void> {
    switch (r.kind) {
      case 'ram-blocks':
        return this.setBlocks(r.blocks);
      case 'ram-page':
        this.pages++;
        return this.put(this.at(r.block, r.offset, r.data.byteLength), r.data);
      case 'ram-zero': {
        this.zeroPages++;
        const at = this.at(r.block, r.offset, PAGE_SIZE);
        // a hole reads as zeros already: only a page written before must be overwritten
        if (r.fill !== 0) return this.put(at, Buffer.alloc(PAGE_SIZE, r.fill));
        if (this.isWritten(at)) return this.put(at, ZERO_PAGE);
        return;
      }
      default:
        return;
    }
  }

  private async setBlocks(blocks: RamBlockInfo[]): Promise<void> {
    if (this.layout) throw new Error('the migration stream announced its RAM blocks (MEM_SIZE) twice');
    this.layout = ramLayout(blocks);
    for (const b of this.layout.blocks) this.offsets.set(b.idstr, b.offset);
    this.written = new Uint8Array(Math.ceil(this.layout.bytes / PAGE_SIZE / 8));
    // the size first, with nothing written: every page is a hole until the stream fills it
    await this.file.truncate(this.layout.bytes);
  }

  private at(block: string, offset: number, length: number): number {
    const base = this.offsets.get(block);
    if (base === undefined) throw new Error(`a RAM page of block "${block}", which the stream's MEM_SIZE list does not name`);
    if (length !== PAGE_SIZE) throw new Error(`a RAM page of ${length} bytes: a RAM image holds ${PAGE_SIZE}-byte pages only`);
    return base + offset;
  }

  private isWritten(at: number): boolean {
    const page = at / PAGE_SIZE;
    return (this.written[page >> 3]! & (1 << (page & 7))) !== 0;
  }

  private async put(at: number, data: Buffer): Promise<void> {
    const page = at / PAGE_SIZE;
    this.written[page >> 3]! |= 1 << (page & 7);
    const run = this.run;
    if (run && run.at + run.bytes === at && run.bytes < MAX_RUN_BYTES) {
      run.parts.push(data);
      run.bytes += data.byteLength;
      return;
    }
    await this.flush();
    this.run = { at, parts: [data], bytes: data.byteLength };
  }

  private async flush(): Promise<void> {
    const run = this.run;
    if (!run) return;
    this.run = undefined;
    await this.file.writev(run.parts, run.at);
  }

  /** Writes what is pending and closes the file. */
  async close(): Promise<void> {
    try {
      await this.flush();
    } finally {
      await this.file.close();
    }
  }

  /** Closes without caring for what is pending (the image is being thrown away). */
  async abandon(): Promise<void> {
    this.run = undefined;
    await this.file.close().catch(() => undefined);
  }
}

const READ_BYTES = 4 << 20;

function isZero(page: Buffer): boolean {
  return page.equals(ZERO_PAGE);
}

/** The non-zero pages of a RAM image, block by block in the layout's order, as page records. */
export async function* readRamImagePages(path: string, layout: RamLayout): AsyncGenerator<Extract<MigrationRecord, { kind: 'ram-page' }>> {
  const file = await open(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(READ_BYTES);
    for (const block of layout.blocks) {
      const end = alignUp(block.bytes, PAGE_SIZE);
      for (let done = 0; done < end; ) {
        const want = Math.min(READ_BYTES, end - done);
        const { bytesRead } = await file.read(buf, 0, want, block.offset + done);
        if (bytesRead !== want) throw new Error(`RAM image ${path} ends inside block "${block.idstr}" (at byte ${block.offset + done + bytesRead})`);
        for (let at = 0; at < want; at += PAGE_SIZE) {
          const page = buf.subarray(at, at + PAGE_SIZE);
          if (!isZero(page)) yield { kind: 'ram-page', block: block.idstr, offset: done + at, data: Buffer.from(page) };
        }
        done += want;
      }
    }
  } finally {
    await file.close();
  }
}
