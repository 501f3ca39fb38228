/**
 * Which disk pages a running QEMU wrote since a point in time, from its dirty bitmaps (what
 * libvirt's incremental backup does): a base adds a non-persistent bitmap on the drive's block
 * node; a handoff freezes copies of it and reads their extents through an NBD export of the node
 * (`qemu:dirty-bitmap:NAME`), so the disk's capture costs what changed, not the disk's size.
 */
import { randomBytes } from 'node:crypto';
import { chown, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { PAGE_SIZE } from '../image/pages.js';
import { NbdClient } from './nbd-client.js';
import type { QmpClient } from './qmp.js';

/** query-block's answer, as far as bitmaps need it. */
export interface BlockDevice {
  device: string;
  qdev?: string;
  inserted?: {
    file: string;
    'node-name'?: string;
    'dirty-bitmaps'?: { name: string; recording?: boolean; busy?: boolean; granularity: number; count: number }[];
  };
}

interface BitmapAction {
  type: 'block-dirty-bitmap-add' | 'block-dirty-bitmap-merge' | 'block-dirty-bitmap-remove';
  data: Record<string, unknown>;
}

declare module './qmp.js' {
  interface QmpCommands {
    'query-block': { args: undefined; result: BlockDevice[] };
    'block-dirty-bitmap-add': { args: { node: string; name: string; persistent?: boolean; granularity?: number; disabled?: boolean }; result: Record<string, never> };
    'block-dirty-bitmap-remove': { args: { node: string; name: string }; result: Record<string, never> };
    transaction: { args: { actions: BitmapAction[] }; result: Record<string, never> };
    'nbd-server-start': { args: { addr: { type: 'unix'; data: { path: string } } }; result: Record<string, never> };
    'nbd-server-stop': { args: undefined; result: Record<string, never> };
    'block-export-add': { args: { type: 'nbd'; id: string; 'node-name': string; name: string; writable: false; bitmaps: string[] }; result: Record<string, never> };
    'block-export-del': { args: { id: string; mode?: 'safe' | 'hard' }; result: Record<string, never> };
  }
}

/** bits of a bitmap: one per page, so the extents name exactly the pages written */
export const BITMAP_GRANULARITY_BYTES = PAGE_SIZE;

/** A run of disk pages. */
export interface PageRun {
  first: number;
  pages: number;
}

export function pagesIn(runs: readonly PageRun[]): number {
  return runs.reduce((n, r) => n + r.pages, 0);
}

/** The block device whose image is `file` (as QEMU names it, or resolved against `cwd`). */
export async function findDriveNode(qmp: QmpClient, file: string, cwd = process.cwd()): Promise<BlockDevice | undefined> {
  const want = resolve(cwd, file);
  return (await qmp.execute('query-block')).find((b) => b.inserted && b.inserted['node-name'] && resolve(cwd, b.inserted.file) === want);
}

/**
 * A fresh bitmap name for a base (bitmaps live as long as the QEMU process, one per base taken of
 * it): random, since it is added while the guest is paused, before the base's content hash exists.
 */
export function baseBitmapName(): string {
  return `handoff-base-${randomBytes(6).toString('hex')}`;
}

/** Starts tracking writes to `node` from now (the bitmap lives until QEMU exits or it is removed). */
export async function addBaseBitmap(qmp: QmpClient, node: string, name: string): Promise<void> {
  await qmp.execute('block-dirty-bitmap-add', { node, name, persistent: false, granularity: BITMAP_GRANULARITY_BYTES });
}

/**
 * A private NBD server QEMU runs while bitmaps are read: each read exports the node with the bitmap
 * (a disabled one: QEMU exports enabled bitmaps only on writable exports) and reads its extents;
 * the exports and the server go at `close`, so that a read in the downtime costs no more than it must.
 */
export class BitmapReader {
  private readonly exports: string[] = [];

  private constructor(
    private readonly qmp: QmpClient,
    private readonly socketDir: string,
  ) {}

  private get socketPath(): string {
    return join(this.socketDir, 'nbd.sock');
  }

  static async open(qmp: QmpClient, qemuUid: number): Promise<BitmapReader> {
    const socketDir = await mkdtemp(join(tmpdir(), 'handoff-nbd-'));
    try {
      // QEMU creates the socket: its user must own the folder
      if (process.getuid?.() === 0 && qemuUid !== 0) await chown(socketDir, qemuUid, -1);
      const reader = new BitmapReader(qmp, socketDir);
      await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: reader.socketPath } } });
      return reader;
    } catch (err) {
      await rm(socketDir, { recursive: true, force: true });
      throw err;
    }
  }

  /** The pages set in `bitmap` of `node`. */
  async read(node: string, bitmap: string): Promise<PageRun[]> {
    const exportId = `handoff-export-${randomBytes(4).toString('hex')}`;
    await this.qmp.execute('block-export-add', { type: 'nbd', id: exportId, 'node-name': node, name: exportId, writable: false, bitmaps: [bitmap] });
    this.exports.push(exportId);
    const client = await NbdClient.connect(this.socketPath, { exportName: exportId, metaContext: `qemu:dirty-bitmap:${bitmap}` });
    try {
      const runs: PageRun[] = [];
      for (const e of await client.blockStatus(0, client.exportBytes)) {
        if (!(e.flags & 1)) continue;
        const first = Math.floor(e.offset / PAGE_SIZE);
        const end = Math.ceil((e.offset + e.length) / PAGE_SIZE);
        const last = runs.at(-1);
        if (last && last.first + last.pages >= first) last.pages = Math.max(last.pages, end - last.first);
        else runs.push({ first, pages: end - first });
      }
      return runs;
    } finally {
      await client.close();
    }
  }

  /** The exports so far removed (their bitmaps are free again). */
  async removeExports(): Promise<void> {
    for (const id of this.exports.splice(0)) await this.qmp.execute('block-export-del', { id, mode: 'hard' }).catch(() => undefined);
  }

  /** The exports removed, the server stopped. */
  async close(): Promise<void> {
    await this.removeExports();
    await this.qmp.execute('nbd-server-stop').catch(() => undefined);
    await rm(this.socketDir, { recursive: true, force: true });
  }
}

/** The pages set in `bitmap` of `node` (a disabled bitmap), through a server of its own. */
export async function readBitmapPages(qmp: QmpClient, node: string, bitmap: string, qemuUid: number): Promise<PageRun[]> {
  const reader = await BitmapReader.open(qmp, qemuUid);
  try {
    return await reader.read(node, bitmap);
  } finally {
    await reader.close();
  }
}

/** Why a base's bitmap cannot serve (QEMU restarted since the base, another disk), or undefined when it can. */
export function bitmapMissing(device: BlockDevice | undefined, bitmap: string, file: string): string | undefined {
  if (!device?.inserted?.['node-name']) return `QEMU has no block device with the image ${file}`;
  const found = device.inserted['dirty-bitmaps']?.find((b) => b.name === bitmap);
  if (!found) return `QEMU has no dirty bitmap ${bitmap} on ${device.device || device.inserted['node-name']} (restarted since the base was taken?)`;
  if (found.busy) return `the dirty bitmap ${bitmap} is busy (another job uses it)`;
  return undefined;
}

/**
 * A handoff's rounds of disk pages, from the base's bitmap. `start` (the beginning of round 0)
 * freezes a copy of the base's bitmap and starts a round bitmap in one transaction, so no write
 * falls between: round 0's pages are the copy's, the final round's (the VM stopped) the round
 * bitmap's. A page written while round 0 reads it is in the round bitmap and goes again.
 */
export class DiskDirtyRounds {
  private readonly added: string[] = [];
  private readonly tag = randomBytes(4).toString('hex');

  private constructor(
    private readonly qmp: QmpClient,
    private readonly node: string,
    private readonly baseBitmap: string,
    private readonly reader: BitmapReader,
  ) {}

  /** Round 0's pages: written since the base's bitmap was added. */
  static async start(qmp: QmpClient, node: string, baseBitmap: string, qemuUid: number): Promise<{ rounds: DiskDirtyRounds; pages: PageRun[] }> {
    const rounds = new DiskDirtyRounds(qmp, node, baseBitmap, await BitmapReader.open(qmp, qemuUid));
    try {
      const frozen = rounds.name('round0');
      await rounds.transaction([...rounds.freeze(baseBitmap, frozen), rounds.add(rounds.name('since-round0'), false)]);
      const pages = await rounds.reader.read(node, frozen);
      // no export of the node while QEMU migrates: it hands the image over at the end
      await rounds.reader.removeExports();
      return { rounds, pages };
    } catch (err) {
      await rounds.close();
      throw err;
    }
  }

  /** The pages written since `start`: called with the VM stopped, so the set is final. */
  async finalPages(): Promise<PageRun[]> {
    const frozen = this.name('final');
    await this.transaction(this.freeze(this.name('since-round0'), frozen));
    return this.reader.read(this.node, frozen);
  }

  /** Removes the exports and the bitmaps this handoff added (the base's stays: it describes the base, not this handoff). */
  async close(): Promise<void> {
    await this.reader.close();
    for (const name of this.added.splice(0).reverse()) await this.qmp.execute('block-dirty-bitmap-remove', { node: this.node, name }).catch(() => undefined);
  }

  private name(what: string): string {
    return `${this.baseBitmap}-${this.tag}-${what}`;
  }

  private add(name: string, disabled: boolean): BitmapAction {
    return { type: 'block-dirty-bitmap-add', data: { node: this.node, name, persistent: false, granularity: BITMAP_GRANULARITY_BYTES, disabled } };
  }

  /** a disabled copy of `source` as it is now */
  private freeze(source: string, copy: string): BitmapAction[] {
    return [this.add(copy, true), { type: 'block-dirty-bitmap-merge', data: { node: this.node, target: copy, bitmaps: [source] } }];
  }

  private async transaction(actions: BitmapAction[]): Promise<void> {
    await this.qmp.execute('transaction', { actions });
    for (const a of actions) if (a.type === 'block-dirty-bitmap-add') this.added.push(a.data.name as string);
  }
}
