/**
 * The pages QEMU's own stream may hold stale, read again from the paused source at the stop.
 * QEMU before 9.0 under TCG clears its dirty log without bringing the TCG TLB up to date (fixed
 * by QEMU commit 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory
 * access"): a store through a TLB entry made before a dirty-log sync is not logged, so the page
 * may never be sent again. Such a store needs the page logged dirty before that sync, and so sent
 * again after it: with the guest paused while QEMU starts its dirty log and first sync (no entry
 * can predate them), only pages the stream carries more than once can be stale, and those are
 * the ones compared with QEMU's memory at the stop, through /proc/PID/mem.
 */
import { readSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { PAGE_SIZE, pageCheck } from '../../shared/image/pages.js';
import { errorMessage } from '../../shared/model/errors.js';
import type { QmpClient } from '../../shared/vm/qmp.js';
import type { FlatPages } from './stream-core.js';

/** the first QEMU whose TCG keeps its dirty log whole */
const TCG_DIRTY_LOG_FIXED = { major: 9, minor: 0 };
/** pages read from QEMU's memory in one read at most */
const READ_PAGES = 1024;
/**
 * unsent pages read through between two resent ones rather than reading twice: copying 32 KiB
 * costs less than another read's round trip (21,151 pages read one run at a time took 488 ms)
 */
const READ_THROUGH_PAGES = 8;

/** Why the source's pages must be checked at the stop, or undefined where its stream holds every write. */
export async function ramCheckReason(qmp: QmpClient): Promise<string | undefined> {
  const [kvm, version] = await Promise.all([qmp.execute('query-kvm'), qmp.execute('query-version')]);
  if (kvm.enabled) return undefined;
  const { major, minor, micro } = version.qemu;
  if (major > TCG_DIRTY_LOG_FIXED.major || (major === TCG_DIRTY_LOG_FIXED.major && minor >= TCG_DIRTY_LOG_FIXED.minor)) return undefined;
  return `QEMU ${major}.${minor}.${micro} under TCG can leave a page's last write out of its stream (fixed in QEMU ${TCG_DIRTY_LOG_FIXED.major}.${TCG_DIRTY_LOG_FIXED.minor})`;
}

/**
 * The pages the stream carried more than once, each with the xxh64 of its last version there:
 * at the stop, a page whose bytes in QEMU differ from that version is one the stream left stale.
 */
export class ResentPages {
  /** per page: 0 not sent, 1 sent once, 2 sent again (its last version's xxh64 in `lastCheck`) */
  private readonly sends: Uint8Array;
  private readonly lastCheck: BigUint64Array;
  count = 0;

  constructor(pages: number) {
    this.sends = new Uint8Array(pages);
    this.lastCheck = new BigUint64Array(pages);
  }

  /** the stream carried `page` (its bytes) for flat page `index` */
  carried(index: number, page: Uint8Array): void {
    const sends = this.sends[index]!;
    if (sends === 0) {
      this.sends[index] = 1;
      return;
    }
    if (sends === 1) {
      this.sends[index] = 2;
      this.count++;
    }
    this.lastCheck[index] = pageCheck(page);
  }

  /** whether the stream carried page `index` more than once */
  isResent(index: number): boolean {
    return this.sends[index] === 2;
  }

  /** `page` was sent for `index` from QEMU's memory: it is the version the destination holds now */
  sent(index: number, page: Uint8Array): void {
    this.lastCheck[index] = pageCheck(page);
  }

  /** whether `page`, read at the stop for `index`, is not the stream's last version of it */
  stale(index: number, page: Uint8Array): boolean {
    return this.sends[index] === 2 && pageCheck(page) !== this.lastCheck[index];
  }

  /**
   * Spans [first, count] of flat pages in [from, to) to read at once: each begins and ends at a
   * resent page, takes in gaps of up to `maxGapPages` between them, and is at most `maxPages` long.
   */
  *spans(from: number, to: number, maxGapPages: number, maxPages: number): Generator<[number, number]> {
    let first = -1;
    let last = -1;
    for (let i = from; i < Math.min(to, this.sends.length); i++) {
      if (this.sends[i] !== 2) continue;
      if (first >= 0 && (i - last > maxGapPages + 1 || i - first >= maxPages)) {
        yield [first, last - first + 1];
        first = -1;
      }
      if (first < 0) first = i;
      last = i;
    }
    if (first >= 0) yield [first, last - first + 1];
  }
}

/** One `info mtree -f` line of the system address space: a guest-physical range and the region mapped there. */
export interface FlatRange {
  start: number;
  end: number;
  kind: string;
  region: string;
  regionOffset: number;
}

/** The ranges of the flat view of QEMU's system address space (AS "memory"), from `info mtree -f`. */
export function systemFlatRanges(mtree: string): FlatRange[] {
  const view = mtree.split(/^FlatView #\d+/m).find((v) => /AS "memory"/.test(v));
  if (!view) return [];
  const ranges: FlatRange[] = [];
  for (const line of view.split(/\r?\n/)) {
    const m = /^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([^)]+)\): (\S+)(?: @([0-9a-f]+))?/.exec(line);
    if (m) ranges.push({ start: Number.parseInt(m[1]!, 16), end: Number.parseInt(m[2]!, 16), kind: m[3]!, region: m[4]!, regionOffset: m[5] ? Number.parseInt(m[5], 16) : 0 });
  }
  return ranges;
}

/** The RAM block a region is (its idstr, or a device's "path/name"), among `idstrs`; undefined where none or several are. */
export function blockOfRegion(region: string, idstrs: readonly string[]): string | undefined {
  const exact = idstrs.find((b) => b === region);
  if (exact) return exact;
  const suffixed = idstrs.filter((b) => b.endsWith(`/${region}`));
  return suffixed.length === 1 ? suffixed[0] : undefined;
}

/**
 * Where each RAM block the guest can write (mapped as RAM, not ROM) starts in QEMU's own memory:
 * the host address of one of its guest-physical pages (HMP gpa2hva) less its offset in the block.
 * A block mapped nowhere writable cannot take a store through the TLB.
 */
export async function writableBlockAddresses(qmp: QmpClient, idstrs: readonly string[]): Promise<Map<string, number>> {
  const hmp = (command: string): Promise<string> => qmp.execute('human-monitor-command', { 'command-line': command });
  const bases = new Map<string, number>();
  for (const r of systemFlatRanges(await hmp('info mtree -f'))) {
    if (r.kind !== 'ram') continue;
    const block = blockOfRegion(r.region, idstrs);
    if (!block || bases.has(block)) continue;
    const answer = await hmp(`gpa2hva 0x${r.start.toString(16)}`);
    const hva = /is (0x[0-9a-f]+)/.exec(answer)?.[1];
    if (!hva) throw new Error(`QEMU gave no host address for guest-physical 0x${r.start.toString(16)} (${r.region}): ${answer.trim()}`);
    bases.set(block, Number(hva) - r.regionOffset);
  }
  return bases;
}

/** What a read of the resent pages did. */
export interface ResentReadResult {
  /** pages the stream carried more than once, compared with QEMU's memory */
  pagesChecked: number;
  /** of those, pages whose bytes in QEMU were not the version last sent: sent from the check */
  pagesStale: number;
  /** reads of QEMU's memory */
  reads: number;
}

/** What the check at the stop did: the read, and the time taken to find where QEMU's RAM blocks are (ms). */
export interface RamCheckResult extends ResentReadResult {
  addressMs: number;
}

/**
 * Reads every resent page of a writable block from the paused QEMU (`pid`) and hands the stale
 * ones to `send`. Fails naming the cause where QEMU's memory cannot be read.
 */
export async function checkResentPages(
  qmp: QmpClient,
  pid: number,
  flat: FlatPages,
  resent: ResentPages,
  send: (index: number, page: Buffer) => Promise<void>,
  /** where the blocks are, asked before (a block's host address lasts as long as QEMU): not asked again */
  known?: ReadonlyMap<string, number>,
): Promise<RamCheckResult> {
  const status = await qmp.execute('query-status');
  if (status.running) throw new Error('the source VM runs again: its RAM cannot be checked at the stop');
  const addressStartMs = performance.now();
  // asked at the stop, HMP's answers took 3-195 ms of the downtime
  const bases = known ?? (await writableBlockAddresses(qmp, flat.blocks.map((b) => b.idstr)));
  const addressMs = Math.round(performance.now() - addressStartMs);
  return { ...(await readResentPages(pid, flat, bases, resent, send)), addressMs };
}

/**
 * Reads every resent page of a block at `bases` from QEMU's memory and hands those that are not
 * the version last sent to `send` (which they then are). Asks nothing of QEMU: while its migration
 * runs, QEMU may be writing its last round holding its main lock, and answer QMP only after.
 */
export async function readResentPages(pid: number, flat: FlatPages, bases: ReadonlyMap<string, number>, resent: ResentPages, send: (index: number, page: Buffer) => Promise<void>): Promise<ResentReadResult> {
  const mem = await open(`/proc/${pid}/mem`, 'r').catch((err: unknown) => {
    throw new Error(`cannot read QEMU's memory (/proc/${pid}/mem): ${errorMessage(err)}`);
  });
  const result: ResentReadResult = { pagesChecked: 0, pagesStale: 0, reads: 0 };
  try {
    const buf = Buffer.allocUnsafe(READ_PAGES * PAGE_SIZE);
    for (const block of flat.blocks) {
      const base = bases.get(block.idstr);
      if (base === undefined) continue;
      const blockFirst = block.offset / PAGE_SIZE;
      for (const [first, count] of resent.spans(blockFirst, blockFirst + Math.ceil(block.bytes / PAGE_SIZE), READ_THROUGH_PAGES, READ_PAGES)) {
        const bytes = count * PAGE_SIZE;
        // read in this thread: at the stop the VM waits on this, and a read through libuv's pool
        // took about 90 µs (1716 reads, 153 ms)
        const bytesRead = readSync(mem.fd, buf, 0, bytes, base + (first - blockFirst) * PAGE_SIZE);
        result.reads++;
        if (bytesRead !== bytes) throw new Error(`QEMU's memory ended at ${block.idstr} offset ${(first - blockFirst) * PAGE_SIZE + bytesRead} (/proc/${pid}/mem)`);
        for (let p = 0; p < count; p++) {
          const index = first + p;
          if (!resent.isResent(index)) continue;
          const page = buf.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
          result.pagesChecked++;
          if (!resent.stale(index, page)) continue;
          result.pagesStale++;
          // the buffer is read into again: the page sent is its own copy
          const copy = Buffer.from(page);
          resent.sent(index, copy);
          await send(index, copy);
        }
      }
    }
  } finally {
    await mem.close();
  }
  return result;
}
