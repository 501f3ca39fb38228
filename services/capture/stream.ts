/**
 * Live capture of the user's own VM from QEMU's migration stream (stream mode: the descriptor's
 * `live.machine`). QEMU migrates to a socket this process listens on; its RAM pages become chunks
 * of the base's flat memory image (only pages that differ from what the destination holds), its
 * passes over the dirty log become rounds, and the sections after the RAM, once QEMU has stopped
 * the VM, the device state. Capture decides when QEMU stops the VM, with the round policy on the pages
 * it sends and the time they take to arrive: QEMU's own estimate counts the pages capture skips
 * (most of round 0), which pass at memory speed, and stopped a VM whose last round then took the
 * link seconds. Reading waits while a round is delivered, so auto-converge sees the real pace.
 * The disk's pages come from QEMU's dirty bitmaps (see disk-dirty.ts): round 0 reads those written
 * since the base, the final round those written since round 0; without the base's bitmap in QEMU
 * the whole disk is read at both.
 * Nothing in the reading waits for QMP: QEMU writes its last round holding its main lock, and
 * answers QMP only after.
 */
import { open, readFile, readlink, rm, stat } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { basename, dirname, join } from 'node:path';
import type { Span } from '@opentelemetry/api';
import { publishEvent, type Bus } from '../../shared/bus/bus.js';
import { encodePatch } from '../../shared/codecs/patch.js';
import { loadBaseIndex } from '../../shared/image/base-index.js';
import { PAGE_SIZE, digestOfPageHashes } from '../../shared/image/pages.js';
import { BadImageError, BaseMismatchError, errorMessage } from '../../shared/model/errors.js';
import type { LiveVm, MigrationDescriptor } from '../../shared/model/migration.js';
import { startSpan } from '../../shared/telemetry/telemetry.js';
import type { Logger } from '../../shared/telemetry/log.js';
import { BASE_MANIFEST_FILE, checkManifest } from '../../shared/vm/base-manifest.js';
import { DiskDirtyRounds, bitmapMissing, findDriveNode, pagesIn, type PageRun } from '../../shared/vm/disk-dirty.js';
import { MigrationStreamParser, type MigrationRecord } from '../../shared/vm/migration-stream.js';
import { MigrationStreamWriter } from '../../shared/vm/migration-stream-writer.js';
import { acceptOne, eventMs, recoverFromMigration, findQemuBehind, listenForQemu, setMigrationCapabilities, streamCapabilitiesOff } from '../../shared/vm/qemu-migration.js';
import { QmpClient } from '../../shared/vm/qmp.js';
import { CpuQuota } from '../../shared/cpu/quota.js';
import { ChunkBuilder, newPageRecord } from './core.js';
import { waitDelivered } from './live.js';
import { captureRound, RoundPublisher, type CaptureGate, type LiveImages, type PublishStats } from './round.js';
import { checkResentPages, ramCheckReason, readResentPages, ResentPages, writableBlockAddresses } from './ram-check.js';
import { FlatPages, PageReference, RoundCutter, decideStreamStop, nextCpuQuotaPct, pagesLeftAtCut, ramBlockDifferences, recentPace, type StreamRoundRecord, type StreamRoundStat } from './stream-core.js';

/** A stream-mode live VM: one with the source's own machine. */
export interface StreamLiveVm extends LiveVm {
  machine: NonNullable<LiveVm['machine']>;
}

/** A VM whose stream cannot be handed off as asked (its RAM is not the base's): refused before any page moves. */
export class StreamRefusedError extends Error {
  override name = 'StreamRefusedError';
}

/** QEMU caps downtime-limit here (ms): set when capture decides to stop, QEMU stops the VM at its next look. */
const DOWNTIME_LIMIT_MAX_MS = 2_000_000;
/** QEMU's downtime-limit until then: QEMU stops on its own only where what is left is next to nothing */
const DOWNTIME_LIMIT_UNTIL_DECIDED_MS = 1;
/** what the stop costs besides the last round's pages: the device state, the disk's final pages, the resume */
const STOP_OVERHEAD_MS = 150;

/** bytes/s: no cap of QEMU's own; the pipeline's reading paces it */
const UNCAPPED_BANDWIDTH = 1e12;
/** how long QEMU may take to connect to the socket after `migrate` */
const CONNECT_TIMEOUT_MS = 10_000;
/** how long QEMU's migration setup may keep the guest paused */
const SETUP_TIMEOUT_MS = 10_000;
/** how often auto-converge's throttle is read while the migration runs */
const THROTTLE_POLL_MS = 500;
/**
 * While the VM runs, the pages QEMU's stream may leave stale are also checked this often (and once
 * more when capture decides to stop): those found go before the stop, not in the downtime (up to
 * 303 pages at the Debian guest's stop), at about 40 ms of capture's time per check.
 */
const LIVE_RAM_CHECK_EVERY_MS = 1000;
/** dirty disk pages are read this many at a time where they run on */
const DISK_READ_PAGES = 1024;

/** The disk's rounds from QEMU's dirty bitmaps: round 0's pages, and the hashes the destination holds. */
interface DiskBitmap {
  rounds: DiskDirtyRounds;
  round0: PageRun[];
  round0Read: boolean;
  reference: PageReference;
}

/** The base's bitmap for the disk if QEMU still has it, else why not (the whole disk is read then). */
async function startDiskBitmap(qmp: QmpClient, d: MigrationDescriptor, qemuUid: number, cwd: string): Promise<DiskBitmap | string> {
  const manifestPath = join(dirname(d.disk.base), BASE_MANIFEST_FILE);
  const text = await readFile(manifestPath, 'utf8').catch(() => undefined);
  if (text === undefined) return `the base disk ${d.disk.base} has no ${BASE_MANIFEST_FILE} beside it`;
  const disk = checkManifest(JSON.parse(text), manifestPath).disks.find((x) => x.file === basename(d.disk.base));
  if (!disk?.dirtyBitmap) return `the base names no dirty bitmap for ${basename(d.disk.base)} (taken before bitmaps, or QEMU had no block node for it)`;
  // a bitmap counts the guest's offsets, which are the file's only in a raw image
  if (disk.format !== 'raw') return `the disk is ${disk.format}: its bitmap's guest offsets are not offsets in the file that is read`;
  const device = await findDriveNode(qmp, d.disk.current, cwd);
  const missing = bitmapMissing(device, disk.dirtyBitmap, d.disk.current);
  if (missing) return missing;
  const index = await loadBaseIndex(d.disk.base);
  if (index.contentHash !== d.disk.baseHash) throw new BaseMismatchError(`base disk ${d.disk.base} changed: content hash ${index.contentHash}, migration expects ${d.disk.baseHash}`);
  const started = await DiskDirtyRounds.start(qmp, device!.inserted!['node-name']!, disk.dirtyBitmap, qemuUid);
  return { rounds: started.rounds, round0: started.pages, round0Read: false, reference: new PageReference(index.hashes) };
}

/** Waits until QEMU's migration has left its setup (its dirty log started and first synced), then resumes the guest; returns how long it was paused (ms). */
async function resumeAfterSetup(qmp: QmpClient): Promise<number> {
  const startedMs = performance.now();
  const deadline = Date.now() + SETUP_TIMEOUT_MS;
  for (;;) {
    const s = await qmp.execute('query-migrate');
    if (s.status !== 'setup') break;
    if (Date.now() > deadline) throw new Error(`QEMU's migration still in setup after ${SETUP_TIMEOUT_MS / 1000} s`);
    await new Promise((r) => setTimeout(r, 2));
  }
  await qmp.execute('cont');
  return Math.round(performance.now() - startedMs);
}

/** The pages of `runs` that differ from `reference` (which becomes them), read from the disk file and published as image 1's chunks. */
async function captureDiskPages(
  bus: Bus,
  d: MigrationDescriptor,
  round: number,
  span: Span,
  report: PublishStats,
  runs: readonly PageRun[],
  reference: PageReference,
  firstSeq: number,
): Promise<{ slices: number; dirtyPages: number; scannedBytes: number; nextSeq: number }> {
  const publisher = new RoundPublisher(bus, d, round, span, undefined, report);
  const builder = new ChunkBuilder({ migrationId: d.migrationId, round, image: 1, parts: d.parts }, d.chunkPages, firstSeq);
  const diskPages = d.disk.bytes / PAGE_SIZE;
  let dirtyPages = 0;
  let scannedBytes = 0;
  const fh = await open(d.disk.current, 'r');
  try {
    const size = (await fh.stat()).size;
    if (size !== d.disk.bytes) throw new BadImageError(`disk image ${d.disk.current} is ${size} bytes now, ${d.disk.bytes} when the migration started`);
    const block = Buffer.allocUnsafe(DISK_READ_PAGES * PAGE_SIZE);
    for (const run of runs) {
      const end = Math.min(run.first + run.pages, diskPages);
      for (let first = run.first; first < end; first += DISK_READ_PAGES) {
        const pages = Math.min(DISK_READ_PAGES, end - first);
        const { bytesRead } = await fh.read(block, 0, pages * PAGE_SIZE, first * PAGE_SIZE);
        if (bytesRead !== pages * PAGE_SIZE) throw new BadImageError(`disk image ${d.disk.current} was truncated while it was read (at page ${first})`);
        scannedBytes += bytesRead;
        for (let p = 0; p < pages; p++) {
          const dirty = reference.changed(first + p, block.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE));
          if (!dirty) continue;
          dirtyPages++;
          if (builder.add(dirty)) await publisher.flush(builder, scannedBytes);
        }
      }
    }
    if (builder.pending > 0) await publisher.flush(builder, scannedBytes);
    await publisher.settle();
  } finally {
    await fh.close();
  }
  return { slices: (builder.nextSeq - firstSeq) * d.parts, dirtyPages, scannedBytes, nextSeq: builder.nextSeq };
}

interface OpenRound {
  builder: ChunkBuilder;
  publisher: RoundPublisher;
  dirtyPages: number;
  startedMs: number;
}

export async function captureStream(bus: Bus, d: MigrationDescriptor, log: Logger, gate: CaptureGate | undefined, report: PublishStats): Promise<void> {
  const live = d.live as StreamLiveVm;
  const base = await loadBaseIndex(d.memory.base);
  if (base.contentHash !== d.memory.baseHash) throw new BaseMismatchError(`base memory ${d.memory.base} changed: content hash ${base.contentHash}, migration expects ${d.memory.baseHash}`);
  const flat = new FlatPages(live.machine.ramBlocks);
  if (flat.pages * PAGE_SIZE !== d.memory.bytes) throw new BaseMismatchError(`the base's RAM blocks place ${flat.pages} pages, its memory image holds ${d.memory.bytes / PAGE_SIZE}`);
  const reference = new PageReference(base.hashes);
  const cutter = new RoundCutter(flat.pages);
  /** the pages QEMU sent more than once, where they are checked at the stop */
  let resent: ResentPages | undefined;
  /** where QEMU's writable RAM blocks are in its memory, for the checks while it runs */
  let liveBases: Map<string, number> | undefined;
  // the disk's hashes as round 0 read them: the final round compares with them
  const disk: LiveImages = { records: [newPageRecord(0), newPageRecord(d.disk.bytes / PAGE_SIZE)], views: [undefined, undefined] };
  const baseState = await readFile(live.baseDeviceState);
  const qemu = findQemuBehind(live.qmpSocket);
  const qemuUid = (await stat(`/proc/${qemu.pid}`)).uid;
  const target = await listenForQemu(qemuUid, 'handoff-capture-');
  const qmp = await QmpClient.connect(live.qmpSocket, 10_000).catch(async (err: unknown) => {
    target.server.close();
    await rm(target.socketDir, { recursive: true, force: true });
    throw err;
  });
  const span = startSpan('capture stream', d.traceparent, { 'handoff.migration': d.migrationId, 'handoff.actor': 'capture' });

  const state = {
    stopEventMs: undefined as number | undefined,
    stopSeenMs: undefined as number | undefined,
    finalPublished: false,
    maxThrottlePct: 0,
    throttlePct: 0,
    forcedStop: false,
    pausedForSetup: false,
    /** QEMU's last report: dirty pages left to send, and its dirty rate */
    remainingPages: Infinity,
    dirtyPagesPerSec: 0,
  };
  const stopListening = qmp.onEvent((e) => {
    // the pause around QEMU's migration setup (below) is not the handoff's stop
    if (e.event === 'STOP' && !state.pausedForSetup) state.stopEventMs ??= eventMs(e) ?? Date.now();
  });
  /** when QEMU stopped the VM: its STOP event's time, else when its RAM END section came */
  const stoppedAt = (): number | undefined => state.stopEventMs ?? state.stopSeenMs;
  let wasRunning = true;
  let quota: CpuQuota | undefined;
  let quotaUnavailable = false;
  let restoreCapabilities = async (): Promise<void> => undefined;
  let restoreParameters = async (): Promise<void> => undefined;
  let socket: Socket | undefined;
  let poller: NodeJS.Timeout | undefined;
  let diskBitmap: DiskBitmap | undefined;
  const abort = new AbortController();
  try {
    wasRunning = (await qmp.execute('query-status')).running;
    const ramCheck = await ramCheckReason(qmp);
    if (ramCheck) {
      resent = new ResentPages(flat.pages);
      // where QEMU's RAM blocks are in its memory, asked now: once QEMU migrates, the reading must not wait on QMP
      liveBases = await writableBlockAddresses(qmp, flat.blocks.map((b) => b.idstr)).catch((err: unknown) => {
        log.warn('the RAM is checked at the stop only', { reason: errorMessage(err) });
        return undefined;
      });
      log.info("pages QEMU sends more than once are checked against its memory while it runs and at the stop", { reason: ramCheck });
    }
    // the disk's round 0 begins here, before the RAM's: its bitmap then holds every write from now
    const bitmap = await startDiskBitmap(qmp, d, qemuUid, await readlink(`/proc/${qemu.pid}/cwd`).catch(() => process.cwd())).catch((err: unknown) =>
      err instanceof BaseMismatchError ? Promise.reject(err) : `QEMU's dirty bitmaps cannot be read: ${errorMessage(err)}`,
    );
    if (typeof bitmap === 'string') log.warn('the disk is read whole at round 0 and at the stop', { reason: bitmap });
    else {
      diskBitmap = bitmap;
      log.info('disk pages from the dirty bitmap', { bitmap: 'base', round0Pages: pagesIn(bitmap.round0), diskPages: d.disk.bytes / PAGE_SIZE });
    }
    restoreCapabilities = await setMigrationCapabilities(qmp, { ...streamCapabilitiesOff(), 'auto-converge': live.autoConverge !== false });
    const previous = await qmp.execute('query-migrate-parameters');
    restoreParameters = async () => {
      const back = Object.fromEntries((['downtime-limit', 'max-bandwidth'] as const).filter((k) => previous[k] !== undefined).map((k) => [k, previous[k]]));
      if (Object.keys(back).length) await qmp.execute('migrate-set-parameters', back);
    };
    await qmp.execute('migrate-set-parameters', { 'downtime-limit': DOWNTIME_LIMIT_UNTIL_DECIDED_MS, 'max-bandwidth': UNCAPPED_BANDWIDTH });
    const timer = setTimeout(() => abort.abort(), CONNECT_TIMEOUT_MS);
    const accepted = acceptOne(target.server, abort.signal, () => new Error(`QEMU did not connect to the migration socket within ${CONNECT_TIMEOUT_MS / 1000} s`));
    accepted.catch(() => undefined);
    // where the stream may miss stores (ram-check.ts), no TLB entry may predate QEMU's first
    // dirty-log sync: the guest is paused until QEMU's setup is done
    const pauseForSetup = ramCheck !== undefined && wasRunning;
    if (pauseForSetup) {
      state.pausedForSetup = true;
      await qmp.execute('stop');
    }
    await qmp.execute('migrate', { uri: `unix:${target.socketPath}` });
    socket = await accepted;
    if (pauseForSetup) {
      const pausedMs = await resumeAfterSetup(qmp);
      state.pausedForSetup = false;
      log.info("guest resumed after QEMU's migration setup", { pausedMs });
    }
    clearTimeout(timer);
    log.info('QEMU migrates into capture', { downtimeTargetMs: live.downtimeMs, autoConverge: live.autoConverge !== false });
    poller = setInterval(() => {
      qmp.execute('query-migrate').then(
        (s) => {
          state.throttlePct = s['cpu-throttle-percentage'] ?? 0;
          state.maxThrottlePct = Math.max(state.maxThrottlePct, state.throttlePct);
          state.remainingPages = (s.ram?.remaining ?? state.remainingPages * PAGE_SIZE) / PAGE_SIZE;
          state.dirtyPagesPerSec = s.ram?.['dirty-pages-rate'] ?? state.dirtyPagesPerSec;
        },
        () => undefined,
      );
    }, THROTTLE_POLL_MS);

    const rounds: StreamRoundRecord[] = [];
    const history: StreamRoundStat[] = [];
    /** halves the source QEMU's CPU quota (the first time: puts one on); undefined where it cannot go lower or there is none to be had */
    const slowGuest = (): number | undefined => {
      if (quotaUnavailable) return undefined;
      try {
        quota ??= CpuQuota.take(qemu.pid);
      } catch (err) {
        quotaUnavailable = true;
        log.warn('cannot slow the guest with a CPU quota: pre-copy stops as it is', { reason: errorMessage(err) });
        return undefined;
      }
      const next = nextCpuQuotaPct(quota.percent);
      if (next === undefined) return undefined;
      quota.limit(next);
      return next;
    };
    const openRound = (round: number): OpenRound => ({
      builder: new ChunkBuilder({ migrationId: d.migrationId, round, image: 0, parts: d.parts }, d.chunkPages),
      publisher: new RoundPublisher(bus, d, round, span, round === 0 ? gate : undefined, report),
      dirtyPages: 0,
      startedMs: performance.now(),
    });
    let current = openRound(0);
    let scannedBytes = 0;
    let blocksChecked = false;

    /** a page read from QEMU's memory that is not the version the destination holds: into the current round */
    const sendFromMemory = async (index: number, page: Buffer): Promise<void> => {
      const dirty = reference.changed(index, page);
      if (!dirty) return;
      current.dirtyPages++;
      if (current.builder.add(dirty)) await current.publisher.flush(current.builder, scannedBytes);
    };
    let lastLiveCheckMs = performance.now();
    let pagesSentBeforeStop = 0;
    /** the resent pages checked while the VM runs (see LIVE_RAM_CHECK_EVERY_MS) */
    const liveRamCheck = async (): Promise<void> => {
      if (!resent || !liveBases) return;
      const startedMs = performance.now();
      const result = await readResentPages(qemu.pid, flat, liveBases, resent, sendFromMemory);
      lastLiveCheckMs = performance.now();
      pagesSentBeforeStop += result.pagesStale;
      log.debug('RAM checked while the VM runs', { round: cutter.round, pagesChecked: result.pagesChecked, pagesStale: result.pagesStale, ms: Math.round(lastLiveCheckMs - startedMs) });
    };

    /**
     * Ends the current round: its pages flushed and acknowledged, the disk read in round 0 and the
     * last. `finalDiskPages`: the final round's disk pages, asked of QEMU while the RAM was checked.
     */
    const endRound = async (final: boolean, finalDiskPages?: Promise<PageRun[]>): Promise<{ slices: number; dirtyPages: number; imageHashes: { memory: string; disk: string } }> => {
      const round = cutter.round;
      if (current.builder.pending > 0) await current.publisher.flush(current.builder, scannedBytes);
      // the RAM's chunks are acknowledged while the disk's are read (the round is announced after both)
      const ramSettled = current.publisher.settle();
      ramSettled.catch(() => undefined);
      let slices = current.builder.nextSeq * d.parts;
      let dirtyPages = current.dirtyPages;
      let diskHash = diskBitmap ? diskBitmap.reference.digest() : digestOfPageHashes(disk.records[1].strong);
      if ((round === 0 || final) && diskBitmap) {
        const startedMs = performance.now();
        // the final round's pages were written since round 0's bitmap was frozen; a round 0 that is
        // also the last reads both (the second read of a page finds it unchanged)
        const sets: PageRun[][] = [];
        if (!diskBitmap.round0Read) sets.push(diskBitmap.round0);
        diskBitmap.round0Read = true;
        if (final) sets.push(await (finalDiskPages ?? diskBitmap.rounds.finalPages()));
        let seq = current.builder.nextSeq;
        for (const runs of sets) {
          const r = await captureDiskPages(bus, d, round, span, report, runs, diskBitmap.reference, seq);
          seq = r.nextSeq;
          slices += r.slices;
          dirtyPages += r.dirtyPages;
          scannedBytes += r.scannedBytes;
        }
        diskHash = diskBitmap.reference.digest();
        log.info('disk captured', { round, final, pagesRead: sets.reduce((n, runs) => n + pagesIn(runs), 0), diskPages: d.disk.bytes / PAGE_SIZE, ms: Math.round(performance.now() - startedMs), from: 'dirty bitmap' });
      } else if (round === 0 || final) {
        const startedMs = performance.now();
        const r = await captureRound(bus, d, round, log, disk, undefined, report, { images: [1], firstSeq: current.builder.nextSeq });
        slices += r.slices;
        dirtyPages += r.dirtyPages;
        scannedBytes += r.scannedBytes;
        diskHash = r.imageHashes.disk;
        log.info('disk captured', { round, final, pagesRead: d.disk.bytes / PAGE_SIZE, diskPages: d.disk.bytes / PAGE_SIZE, ms: Math.round(performance.now() - startedMs), from: 'whole disk' });
      }
      await ramSettled;
      return { slices, dirtyPages, imageHashes: { memory: reference.digest(), disk: diskHash } };
    };

    /** A round QEMU's next pass (or its stop) ended: announced, delivered before reading on unless the VM is stopped. */
    const cutRound = async (why: string): Promise<void> => {
      const round = cutter.round;
      const r = await endRound(false);
      await publishEvent(bus, d.migrationId, { type: 'captured', round, slices: r.slices, imageHashes: r.imageHashes, dirtyPages: r.dirtyPages, scannedBytes, final: false });
      // while the VM runs, QEMU waits (its writes block) until the round has arrived: its bandwidth
      // estimate is then the pipeline's real pace; once stopped, waiting is only downtime
      if (stoppedAt() === undefined) await waitDelivered(bus, d);
      const seconds = (performance.now() - current.startedMs) / 1000;
      const pagesSeen = cutter.pagesSeen;
      rounds.push({ round, dirtyPages: r.dirtyPages, seconds: Number(seconds.toFixed(3)), decision: why, cpuThrottlePct: state.throttlePct });
      log.info('stream round delivered', { round, dirtyPages: r.dirtyPages, pagesSeen: cutter.pagesSeen, seconds: Number(seconds.toFixed(2)), cpuThrottlePct: state.throttlePct });
      cutter.next();
      current = openRound(cutter.round);
      if (stoppedAt() !== undefined || state.forcedStop) return;
      if (performance.now() - lastLiveCheckMs >= LIVE_RAM_CHECK_EVERY_MS) await liveRamCheck();
      history.push({ dirtyPages: r.dirtyPages, pagesSeen, seconds });
      const decision = decideStreamStop({
        remainingPages: pagesLeftAtCut(state.remainingPages, state.dirtyPagesPerSec, THROTTLE_POLL_MS / 1000, seconds),
        dirtyPagesPerSec: state.dirtyPagesPerSec,
        ...recentPace(history),
        roundsDone: history.length,
        maxRounds: live.maxRounds,
        downtimeMs: live.downtimeMs,
        overheadMs: STOP_OVERHEAD_MS,
        canSlow: live.autoConverge !== false && !quotaUnavailable && nextCpuQuotaPct(quota?.percent ?? 100) !== undefined,
      });
      rounds.at(-1)!.decision += `; ${decision.reason}`;
      rounds.at(-1)!.predictedDowntimeMs = Math.round(decision.predictedDowntimeMs);
      if (decision.action === 'slow') {
        const slowed = slowGuest();
        if (slowed !== undefined) {
          rounds.at(-1)!.decision += `: the guest slowed to ${slowed}% of a core`;
          rounds.at(-1)!.cpuQuotaPct = slowed;
          log.info('guest slowed: it dirties faster than pages are delivered', { round, cpuQuotaPct: slowed, predictedDowntimeMs: Math.round(decision.predictedDowntimeMs) });
          return;
        }
      }
      if (quota) rounds.at(-1)!.cpuQuotaPct = quota.percent;
      if (decision.action === 'stop') {
        await liveRamCheck();
        // QEMU stops the VM at its next look, whatever is left becomes the last round
        state.forcedStop = true;
        // not awaited: QEMU may answer only once its migration thread, writing to this process's
        // socket while it holds QEMU's lock (the stop), has written; the reading must go on meanwhile
        qmp.execute('migrate-set-parameters', { 'downtime-limit': DOWNTIME_LIMIT_MAX_MS }).catch((err: unknown) => log.warn('cannot tell QEMU to stop the VM', { reason: errorMessage(err) }));
      }
    };

    const writer = new MigrationStreamWriter();
    const deviceState: Buffer[] = [];
    const takePage = async (block: string, offset: number, page: Buffer, hash?: Buffer): Promise<void> => {
      if (!blocksChecked) throw new StreamRefusedError("QEMU's stream sent a RAM page before its RAM block list (MEM_SIZE)");
      const index = flat.index(block, offset);
      if (cutter.repeats(index)) await cutRound(stoppedAt() === undefined ? "a page came again: QEMU's next pass" : 'QEMU stopped the VM');
      cutter.see(index);
      resent?.carried(index, page);
      scannedBytes += PAGE_SIZE;
      const dirty = reference.changed(index, page, hash);
      if (!dirty) return;
      current.dirtyPages++;
      if (current.builder.add(dirty)) await current.publisher.flush(current.builder, scannedBytes);
    };
    const take = async (r: MigrationRecord): Promise<void> => {
      switch (r.kind) {
        case 'ram-blocks': {
          const differences = ramBlockDifferences(r.blocks, live.machine.ramBlocks);
          if (differences.length) throw new StreamRefusedError(`the VM's RAM is not the base's: ${differences.join('; ')}`);
          blocksChecked = true;
          return;
        }
        case 'ram-page':
          return takePage(r.block, r.offset, r.data);
        case 'ram-zero': {
          const { page, hash } = PageReference.filled(r.fill);
          return takePage(r.block, r.offset, page, hash);
        }
        case 'ram-section':
          // QEMU sends the RAM's END section once it has stopped the VM: the pages before are a round of their own
          if (r.phase === 'end') {
            state.stopSeenMs ??= Date.now();
            if (cutter.pagesSeen > 0) await cutRound('QEMU stopped the VM');
          }
          return;
        case 'ram-eos':
          return;
        case 'configuration':
          if (r.targetPageBits !== undefined && 1 << r.targetPageBits !== PAGE_SIZE) throw new StreamRefusedError(`the VM's target pages are ${1 << r.targetPageBits} bytes, not ${PAGE_SIZE}`);
          break;
        default:
          break;
      }
      deviceState.push(writer.encode(r));
    };

    const parser = new MigrationStreamParser();
    for await (const chunk of socket as AsyncIterable<Buffer>) for (const r of parser.push(chunk)) await take(r);
    for (const r of parser.end()) await take(r);
    if (stoppedAt() === undefined) throw new Error("QEMU's migration stream ended without QEMU stopping the VM");

    const stoppedAtMs = stoppedAt()!;
    const round = cutter.round;
    // the VM is stopped and QEMU's stream done: the disk's last pages are asked for while the RAM is checked
    const finalDiskPages = diskBitmap?.rounds.finalPages();
    finalDiskPages?.catch(() => undefined);
    let checked: StreamRoundRecord['ramCheck'];
    if (resent) {
      const startedMs = performance.now();
      const result = await checkResentPages(qmp, qemu.pid, flat, resent, sendFromMemory, liveBases);
      checked = { reason: ramCheck!, ...result, pagesSentBeforeStop, ms: Math.round(performance.now() - startedMs) };
      if (result.pagesStale > 0) log.warn("pages QEMU's stream left stale, sent from the source's memory", { round, ...checked });
      else log.info("RAM check at the stop: QEMU's stream held every page's last version", { round, ...checked });
    }
    const r = await endRound(true, finalDiskPages);
    const status = await qmp.waitMigration(10_000).then(() => qmp.execute('query-migrate'));
    clearInterval(poller);
    const encoded = encodePatch(Buffer.concat(deviceState), baseState, 3).toString('base64');
    rounds.push({
      round,
      dirtyPages: r.dirtyPages,
      seconds: Number(((performance.now() - current.startedMs) / 1000).toFixed(3)),
      decision: 'stop-and-copy: QEMU stopped the VM',
      cpuThrottlePct: state.maxThrottlePct,
      ...(checked ? { ramCheck: checked } : {}),
      ...(status.downtime !== undefined ? { qemuDowntimeMs: status.downtime } : {}),
    });
    await publishEvent(bus, d.migrationId, {
      type: 'captured',
      round,
      slices: r.slices,
      imageHashes: r.imageHashes,
      dirtyPages: r.dirtyPages,
      scannedBytes,
      final: true,
      deviceState: encoded,
      stoppedAtMs,
      rounds,
    });
    state.finalPublished = true;
    log.info('final round captured', { round, dirtyPages: r.dirtyPages, deviceStateBytes: Buffer.concat(deviceState).byteLength, qemuDowntimeMs: status.downtime, maxCpuThrottlePct: state.maxThrottlePct, sinceStopMs: Math.round(Date.now() - stoppedAtMs) });
    await restoreCapabilities().catch(() => undefined);
    await restoreParameters().catch(() => undefined);
  } catch (err) {
    if (state.finalPublished) throw err;
    // nothing the destination could resume has left: the source runs on
    socket?.destroy();
    const left = await recoverFromMigration(qmp, wasRunning, async () => {
      await restoreCapabilities();
      await restoreParameters();
    });
    log.error('stream capture failed: the source VM runs on', { reason: errorMessage(err), ...(left ? { left } : {}) });
    throw new Error(`${errorMessage(err)} (${left ?? 'the source VM runs on'})`);
  } finally {
    // the quota goes with the handoff: a source that runs on runs at full speed
    quota?.release();
    clearInterval(poller);
    abort.abort();
    stopListening();
    span.end();
    // the bitmaps this handoff added (never the base's)
    await diskBitmap?.rounds.close();
    qmp.close();
    target.server.close();
    await rm(target.socketDir, { recursive: true, force: true });
  }
}
