/**
 * The pure part of capturing memory from QEMU's own migration stream (stream.ts wires it): the
 * stream's RAM blocks checked against the base's, each page placed in the base's flat memory image,
 * rounds cut where a page comes a second time, and each page compared with the version the
 * destination holds (the base's, then the last one sent).
 */
import { formatBytes } from '../../shared/config/units.js';
import type { RoundRecord } from '../../shared/model/migration.js';
import { PAGE_SIZE, STRONG_HASH_BYTES, ZERO_PAGE, ZERO_PAGE_HASH, digestOfPageHashes, strongHash } from '../../shared/image/pages.js';
import type { RamBlockInfo } from '../../shared/vm/migration-stream.js';
import type { RamBlockPlacement } from '../../shared/vm/ram-image.js';
import type { DirtyPage } from './core.js';

/** A stream round as the source saw it, with what QEMU said about it. */
export interface StreamRoundRecord extends RoundRecord {
  /** how far QEMU's auto-converge throttled the guest's vCPUs when the round ended (%, 0: not at all) */
  cpuThrottlePct?: number;
  /** the final round: how long QEMU says the VM was stopped at the source (its `downtime`) */
  qemuDowntimeMs?: number;
  /** the CPU quota capture put on the source's QEMU when the round ended (% of a core; absent: none) */
  cpuQuotaPct?: number;
  /** the final round: the pages QEMU sent more than once, compared with its memory at the stop (ram-check.ts), and those found stale there */
  ramCheck?: {
    reason: string;
    pagesChecked: number;
    pagesStale: number;
    reads: number;
    addressMs: number;
    ms: number;
    /** stale pages found and sent by the checks while the VM ran */
    pagesSentBeforeStop: number;
  };
}

/**
 * What differs between the stream's MEM_SIZE list and the base's RAM blocks (same names, sizes and
 * order), one sentence each; empty when they are the same.
 */
export function ramBlockDifferences(stream: readonly RamBlockInfo[], base: readonly RamBlockPlacement[]): string[] {
  const differences: string[] = [];
  const inBase = new Map(base.map((b, i) => [b.idstr, { bytes: b.bytes, at: i }]));
  const inStream = new Map(stream.map((b, i) => [b.idstr, { bytes: b.lengthBytes, at: i }]));
  for (const [idstr, s] of inStream) {
    const b = inBase.get(idstr);
    if (!b) differences.push(`RAM block "${idstr}" (${formatBytes(s.bytes)}) is in the VM, not in the base`);
    else if (b.bytes !== s.bytes) differences.push(`RAM block "${idstr}": ${formatBytes(s.bytes)} in the VM, ${formatBytes(b.bytes)} in the base`);
  }
  for (const [idstr, b] of inBase) if (!inStream.has(idstr)) differences.push(`RAM block "${idstr}" (${formatBytes(b.bytes)}) is in the base, not in the VM`);
  if (differences.length === 0 && stream.some((s, i) => s.idstr !== base[i]!.idstr)) {
    differences.push(`the RAM blocks come in another order: ${stream.map((s) => s.idstr).join(', ')} in the VM, ${base.map((b) => b.idstr).join(', ')} in the base`);
  }
  return differences;
}

/** Where each RAM block's pages are in the base's memory image: flat page index = (block offset + offset) / 4096. */
export class FlatPages {
  private readonly byName = new Map<string, RamBlockPlacement>();
  readonly pages: number;

  constructor(readonly blocks: readonly RamBlockPlacement[]) {
    for (const b of blocks) this.byName.set(b.idstr, b);
    const last = blocks.at(-1);
    this.pages = last ? Math.ceil((last.offset + last.bytes) / PAGE_SIZE) : 0;
  }

  /** the block and offset of flat page `index` (the inverse of `index`) */
  locate(index: number): { block: string; offset: number } {
    const at = index * PAGE_SIZE;
    const b = this.blocks.find((x) => at >= x.offset && at < x.offset + Math.ceil(x.bytes / PAGE_SIZE) * PAGE_SIZE);
    if (!b) throw new RangeError(`flat page ${index} is in no RAM block`);
    return { block: b.idstr, offset: at - b.offset };
  }

  index(block: string, offset: number): number {
    const b = this.byName.get(block);
    if (!b) throw new RangeError(`a RAM page of block "${block}", which the base does not have`);
    if (offset % PAGE_SIZE !== 0 || offset + PAGE_SIZE > Math.ceil(b.bytes / PAGE_SIZE) * PAGE_SIZE) throw new RangeError(`RAM page at ${offset} of block "${block}" (${b.bytes} bytes) is outside it`);
    return (b.offset + offset) / PAGE_SIZE;
  }
}

/**
 * Rounds as QEMU's passes over its dirty log make them: QEMU sends a page once per pass, so a page
 * that comes again within a round is the next pass, and ends the round before it.
 */
export class RoundCutter {
  /** per page: the round it was last seen in, plus one (0: not yet) */
  private readonly seenIn: Uint32Array;
  round = 0;
  /** pages seen in the current round, changed or not */
  pagesSeen = 0;

  constructor(pages: number) {
    this.seenIn = new Uint32Array(pages);
  }

  /** whether `index` was seen in the current round already (the round ends before it) */
  repeats(index: number): boolean {
    return this.seenIn[index] === this.round + 1;
  }

  see(index: number): void {
    this.seenIn[index] = this.round + 1;
    this.pagesSeen++;
  }

  next(): void {
    this.round++;
    this.pagesSeen = 0;
  }
}

/**
 * Each page's strong hash as the destination holds it: the base's to begin with, then the version
 * last sent. A page equal to it is not sent again.
 */
export class PageReference {
  readonly strong: Buffer;

  constructor(baseHashes: Uint8Array) {
    this.strong = Buffer.from(baseHashes);
  }

  /** The page to send if it differs from the reference (which becomes it), else undefined. */
  changed(index: number, page: Uint8Array, hash: Buffer = strongHash(page)): DirtyPage | undefined {
    const at = index * STRONG_HASH_BYTES;
    if (at + STRONG_HASH_BYTES > this.strong.byteLength) throw new RangeError(`page ${index} is outside the memory image (${this.strong.byteLength / STRONG_HASH_BYTES} pages)`);
    if (hash.compare(this.strong, at, at + STRONG_HASH_BYTES) === 0) return undefined;
    hash.copy(this.strong, at);
    return { index, page, hash };
  }

  /** A zero page record's page (its fill byte repeated), with its hash. */
  static filled(fill: number): { page: Buffer; hash: Buffer } {
    if (fill === 0) return { page: ZERO_PAGE, hash: ZERO_PAGE_HASH };
    const page = Buffer.alloc(PAGE_SIZE, fill);
    return { page, hash: strongHash(page) };
  }

  /** the memory image's digest as the destination will compute it */
  digest(): string {
    return digestOfPageHashes(this.strong);
  }
}

/** The CPU quota that slows a guest dirtying faster than pages are delivered: halved at each such round, down to a floor. */
export const FIRST_CPU_QUOTA_PCT = 50;
export const MIN_CPU_QUOTA_PCT = 6;

/** The next CPU quota (% of a core) after `currentPct` (100: none yet); undefined where it would go below the floor. */
export function nextCpuQuotaPct(currentPct: number): number | undefined {
  const next = currentPct >= 100 ? FIRST_CPU_QUOTA_PCT : Math.floor(currentPct / 2);
  return next >= MIN_CPU_QUOTA_PCT ? next : undefined;
}

/** A round as the stop decision sees it: the pages it sent, those QEMU sent in it (changed or not), how long it took to deliver. */
export interface StreamRoundStat {
  dirtyPages: number;
  pagesSeen: number;
  seconds: number;
}

/**
 * The rounds of about the last this many seconds stand for the final round: several of QEMU's
 * short passes, recent enough to follow a throttle. Round 0, mostly pages that dedup against the
 * base, is left out once later rounds exist.
 */
export const RECENT_ROUNDS_SECONDS = 2;

/**
 * The pace pages were delivered at in the recent rounds, and the share of QEMU's pages they found
 * changed: QEMU's dirty log counts a page rewritten with the same bytes, which costs nothing.
 */
export function recentPace(history: readonly StreamRoundStat[]): { deliveredPagesPerSec: number; changedShare: number } {
  const later = history.length > 1 ? history.slice(1) : history;
  let sum = { dirtyPages: 0, pagesSeen: 0, seconds: 0 };
  for (let i = later.length - 1; i >= 0 && sum.seconds < RECENT_ROUNDS_SECONDS; i--) {
    const r = later[i]!;
    sum = { dirtyPages: sum.dirtyPages + r.dirtyPages, pagesSeen: sum.pagesSeen + r.pagesSeen, seconds: sum.seconds + r.seconds };
  }
  return { deliveredPagesPerSec: sum.seconds > 0 ? sum.dirtyPages / sum.seconds : 0, changedShare: sum.pagesSeen > 0 ? Math.min(1, sum.dirtyPages / sum.pagesSeen) : 1 };
}

/**
 * QEMU's dirty pages left when a round is cut. A round is cut where QEMU's next pass begins, just
 * after it synced its dirty log: the pass then holds what was dirtied while the round ran, which a
 * report of `remaining` taken before the sync (up to a poll old) does not show.
 */
export function pagesLeftAtCut(reportedRemainingPages: number, dirtyPagesPerSec: number, reportAgeSeconds: number, roundSeconds: number): number {
  return Math.round(Math.max(reportedRemainingPages + dirtyPagesPerSec * reportAgeSeconds, dirtyPagesPerSec * roundSeconds));
}

/** What the stream capture knows after a round, for deciding when QEMU is to stop the VM. */
export interface StreamStopInput {
  /** QEMU's dirty pages still to send (its `ram.remaining`, in pages), at its last report */
  remainingPages: number;
  /** QEMU's measured dirty rate (pages/s) */
  dirtyPagesPerSec: number;
  /** pages this handoff sent and had delivered, per second, in the recent rounds (recentPace) */
  deliveredPagesPerSec: number;
  /** of the pages QEMU sent in the recent rounds, the share that had changed (recentPace): QEMU's two figures are scaled by it */
  changedShare: number;
  roundsDone: number;
  maxRounds: number;
  downtimeMs: number;
  /** fixed costs of the stop: the device state, the disk's final capture, the resume */
  overheadMs: number;
  /** the guest can still be slowed (a CPU quota not yet at its floor) */
  canSlow: boolean;
}

export type StreamStopDecision = { action: 'stop' | 'continue' | 'slow'; predictedDowntimeMs: number; reason: string };

/**
 * After a round: stop when QEMU's remaining dirty pages would cross at the delivered pace within
 * the downtime target; slow the guest where it dirties at least as fast as pages are delivered
 * (waiting would not shrink what is left); stop anyway at the round limit or where it cannot be
 * slowed further and is not converging. QEMU's own figures count what it has to send, where the
 * rounds this capture sees are cut wherever QEMU resends a page (mid-pass syncs make them small).
 */
export function decideStreamStop(i: StreamStopInput): StreamStopDecision {
  const leftPages = Math.round(i.remainingPages * i.changedShare);
  const dirtyPagesPerSec = i.dirtyPagesPerSec * i.changedShare;
  const predictedDowntimeMs = i.overheadMs + (i.deliveredPagesPerSec > 0 ? (leftPages / i.deliveredPagesPerSec) * 1000 : Infinity);
  const shown = Math.round(predictedDowntimeMs);
  const left = `QEMU has ${i.remainingPages} pages left, about ${leftPages} of them changed`;
  if (predictedDowntimeMs <= i.downtimeMs) return { action: 'stop', predictedDowntimeMs, reason: `${left}: ${shown} ms at the delivered pace fits ${i.downtimeMs} ms` };
  if (i.roundsDone >= i.maxRounds) return { action: 'stop', predictedDowntimeMs, reason: `round limit ${i.maxRounds} (predicted downtime ${shown} ms)` };
  const converging = dirtyPagesPerSec < i.deliveredPagesPerSec;
  const rates = `${Math.round(dirtyPagesPerSec)} changed pages/s dirtied, ${Math.round(i.deliveredPagesPerSec)} delivered`;
  if (!converging && i.canSlow) return { action: 'slow', predictedDowntimeMs, reason: `not converging (${rates})` };
  if (!converging) return { action: 'stop', predictedDowntimeMs, reason: `not converging (${rates}) and the guest slowed as far as it goes` };
  return { action: 'continue', predictedDowntimeMs, reason: `${left} (${shown} ms): another round` };
}
