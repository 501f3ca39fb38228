/**
 * The receiver's migrations: each one's rebuild as chunks come off the link, its verification and
 * result (on the link and the destination's bus), and for a live one the VM it resumes.
 */
import { mkdirSync, rmSync } from 'node:fs';
import type { Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { SpanStatusCode, type Span } from '@opentelemetry/api';
import type { ActorContext } from '../../shared/actor/shell.js';
import type { BaseIndex } from '../../shared/image/base-index.js';
import { PAGE_SIZE } from '../../shared/image/pages.js';
import { errorMessage } from '../../shared/model/errors.js';
import type { ImageDigests, RebuildResult } from '../../shared/model/migration.js';
import { chunkTraced, startSpan, traceparentOf } from '../../shared/telemetry/telemetry.js';
import type { Logger } from '../../shared/telemetry/log.js';
import { decodeChunk } from '../../shared/wire/chunk-codec.js';
import { FrameType, MAX_APPLIED_FRAMES, encodeJsonFrame, type Accept, type Captured, type Hello } from '../../shared/wire/frames.js';
import { Rebuilder } from './core.js';
import { VmResumer, type DestinationVm, type ResumeOptions, type ResumedVm } from './resume.js';
import { FilePageStore } from './store.js';
import { WrittenPages } from './stream-resume.js';
import { StreamResumer, type FeedFigures, type StreamResumeOptions } from './stream-resumer.js';
import { failedResult, verifiedResult } from './verify.js';

export interface ReceivedMigration {
  migrationId: string;
  result: RebuildResult;
  /** live: the VM running here now */
  vm?: ResumedVm;
  /** live, the source's own machine: what feeding its QEMU took */
  feed?: FeedFigures;
  memoryPath: string;
  diskPath: string;
}

/** One migration being rebuilt here. */
export interface MigrationState {
  migrationId: string;
  log: Logger;
  store: FilePageStore;
  rebuilder: Rebuilder;
  sourceHashes?: ImageDigests;
  link?: Socket;
  startedMs: number;
  duplicates: number;
  finished: boolean;
  /** the sender link's id and the frame numbers applied on it (newest last), for a resume */
  linkId?: string;
  appliedFrames: number[];
  /** the source's last round has been announced */
  final: boolean;
  /** live: the VM waiting for its device state, and that state (from the final round) */
  vm?: Promise<DestinationVm>;
  deviceState?: string;
  /** the rebuild's span (a child of the sender's link span) and which chunks get their own */
  span: Span;
  traceEveryChunks: number | undefined;
}

/**
 * `socket` now carries `state`'s migration, sent by the sender link `linkId`: what the accept tells
 * it (the same link resuming learns which of its frames were applied already).
 */
export function attachLink(state: MigrationState, socket: Socket, linkId: string | undefined, baseHashes: ImageDigests): Accept {
  state.link = socket;
  const sameLink = linkId !== undefined && linkId === state.linkId;
  if (!sameLink) state.appliedFrames = [];
  state.linkId = linkId;
  return { baseHashes, ...(sameLink ? { appliedFrames: state.appliedFrames } : {}) };
}

/** frame `frameNo` of the current link is applied (the last MAX_APPLIED_FRAMES are kept) */
export function recordApplied(state: MigrationState, frameNo: number): void {
  state.appliedFrames.push(frameNo);
  if (state.appliedFrames.length > MAX_APPLIED_FRAMES) state.appliedFrames.splice(0, state.appliedFrames.length - MAX_APPLIED_FRAMES);
}

/** Outcomes in the order they come, to whoever asks next (or waits). */
export class ResultQueue<T> {
  private readonly ready: T[] = [];
  private readonly waiters: ((r: T) => void)[] = [];

  push(r: T): void {
    const w = this.waiters.shift();
    if (w) w(r);
    else this.ready.push(r);
  }

  next(): Promise<T> {
    const r = this.ready.shift();
    return r ? Promise.resolve(r) : new Promise((resolve) => this.waiters.push(resolve));
  }
}

/** finished migrations' results kept for a source that reconnects after the result was sent */
const FINISHED_RESULTS_KEPT = 256;

/** What the migrations are rebuilt from and into. */
export interface RebuildSetup {
  baseMemory: string;
  baseDisk: string;
  memoryIndex: BaseIndex;
  diskIndex: BaseIndex;
  outDir: string;
  /** each migration's images in OUT/<migrationId>/ (a receiver serving many), else OUT/ */
  perMigrationDirs?: boolean;
  /** live handoffs: resume the VM here */
  vm?: ResumeOptions;
  /** live handoffs of the source's own machine (RAM from QEMU's stream): resume it here */
  stream?: StreamResumeOptions;
}

/** A live migration whose VM is loaded: the source's go resumes it (once, however often asked). */
export interface Resumer {
  resume(): Promise<number>;
  reportResumed(): void;
}

export class Migrations {
  private readonly states = new Map<string, MigrationState>();
  /** finished migrations' results, for a source that reconnects after the result was sent (bounded) */
  private readonly finishedResults = new Map<string, RebuildResult>();
  private readonly resumers = new Map<string, Resumer>();
  /** each migration's outcome, in order */
  readonly results = new ResultQueue<ReceivedMigration>();

  constructor(
    private readonly ctx: ActorContext,
    private readonly setup: RebuildSetup,
  ) {}

  /** where a migration's images go: OUT/ for one-shot use, OUT/<migrationId>/ for a serving receiver */
  pathsOf(migrationId: string): { memoryPath: string; diskPath: string } {
    const dir = this.setup.perMigrationDirs ? join(this.setup.outDir, migrationId) : this.setup.outDir;
    return { memoryPath: join(dir, 'memory.img'), diskPath: join(dir, 'disk.img') };
  }

  get(migrationId: string): MigrationState | undefined {
    return this.states.get(migrationId);
  }

  finishedResult(migrationId: string): RebuildResult | undefined {
    return this.finishedResults.get(migrationId);
  }

  resumer(migrationId: string): Resumer | undefined {
    return this.resumers.get(migrationId);
  }

  /** A migration a handshake brings for the first time: fresh images, and for a live one its VM started. */
  open(hello: Hello, log: Logger): MigrationState {
    const { migrationId } = hello;
    const { memoryIndex, diskIndex } = this.setup;
    const { memoryPath, diskPath } = this.pathsOf(migrationId);
    mkdirSync(dirname(memoryPath), { recursive: true });
    rmSync(memoryPath, { force: true });
    rmSync(diskPath, { force: true });
    const store = new FilePageStore([
      { base: this.setup.baseMemory, out: memoryPath, bytes: memoryIndex.bytes },
      { base: this.setup.baseDisk, out: diskPath, bytes: diskIndex.bytes },
    ]);
    const copyStartMs = performance.now();
    store.ready.then(
      () => log.info('rebuilt images started as copies of the base', { ms: Math.round(performance.now() - copyStartMs) }),
      () => undefined,
    );
    const state: MigrationState = {
      migrationId,
      log,
      store,
      rebuilder: new Rebuilder(store, migrationId, [memoryIndex.hashes, diskIndex.hashes]),
      startedMs: performance.now(),
      duplicates: 0,
      finished: false,
      appliedFrames: [],
      span: startSpan('receive', hello.traceparent, { 'handoff.actor': 'receiver', 'handoff.migration': migrationId }),
      traceEveryChunks: hello.traceEveryChunks,
      final: false,
    };
    if (hello.vm && this.setup.vm) {
      // started now, on the images being rebuilt: its start-up is not downtime
      const files = { memory: `${memoryPath}.partial`, disk: `${diskPath}.partial` };
      const vm = hello.vm;
      const options = this.setup.vm;
      state.vm = store.ready.then(() => VmResumer.prepare(vm, options, files, dirname(memoryPath), log));
      state.vm.catch((err: unknown) => log.error('destination VM did not start', { reason: errorMessage(err) }));
    } else if (hello.machine && this.setup.stream) {
      // started now and fed as the rebuild goes: only the last round and the devices are downtime
      const written = new WrittenPages(store.pageCount(0));
      store.onWrite = (image, index) => {
        if (image === 0) written.mark(index);
      };
      const files = { memory: `${memoryPath}.partial`, disk: `${diskPath}.partial` };
      // a QEMU that fails ends the migration with its reason, before more pages cross for nothing
      const failed = (reason: string): void => void this.finish(state, reason);
      const machine = hello.machine;
      const options = this.setup.stream;
      state.vm = store.ready.then(() => StreamResumer.prepare(machine, options, files, dirname(memoryPath), { written, flush: () => store.flush() }, log, failed));
      state.vm.catch((err: unknown) => {
        log.error('destination VM did not start', { reason: errorMessage(err) });
        failed(`destination VM did not start: ${errorMessage(err)}`);
      });
    }
    this.states.set(migrationId, state);
    return state;
  }

  /**
   * Chunks are applied as they come off the link, with no bus hop: the rebuilt images are the
   * destination's state, and a chunk not acknowledged is still in the source's wire queue.
   */
  applyChunk(state: MigrationState, bytes: Uint8Array): void {
    if (state.finished) return;
    const started = performance.now();
    const cpu = process.cpuUsage();
    try {
      const chunk = decodeChunk(bytes);
      const span = chunkTraced(chunk.seq, state.traceEveryChunks) && state.span.isRecording() ? startSpan('apply chunk', traceparentOf(state.span), { 'handoff.actor': 'receiver', 'handoff.seq': chunk.seq, 'handoff.part': chunk.part }) : undefined;
      const r = state.rebuilder.apply(chunk);
      span?.end();
      if (r.duplicate) state.duplicates++;
      const used = process.cpuUsage(cpu);
      this.ctx.publishStats({
        migrationId: state.migrationId,
        round: chunk.round,
        seq: chunk.seq,
        part: chunk.part,
        pages: chunk.pageIndex.length,
        bytesIn: bytes.byteLength,
        bytesOut: r.pagesWritten * PAGE_SIZE,
        cpuMs: (used.user + used.system) / 1000,
        wallMs: performance.now() - started,
        mode: chunk.mode,
        counts: { pagesWritten: r.pagesWritten, pagesDeferred: r.pagesDeferred },
      });
      this.checkDone(state);
    } catch (err) {
      state.log.error('chunk rejected', { reason: errorMessage(err) });
      void this.finish(state, errorMessage(err));
    }
  }

  /** the source has captured a round: its slices and image hashes (and for the last, the VM's device state) */
  captured(state: MigrationState, captured: Captured): void {
    state.sourceHashes = captured.imageHashes;
    state.rebuilder.expect(captured.round, captured.slices);
    if (captured.final !== false) state.final = true;
    if (captured.deviceState) state.deviceState = captured.deviceState;
    this.checkDone(state);
  }

  private checkDone(state: MigrationState): void {
    if (!state.finished && state.final && state.sourceHashes && state.rebuilder.complete) void this.finish(state);
  }

  /** The migration's result: verified (or why not), on its link and the bus, and its images kept or discarded. */
  async finish(state: MigrationState, failure?: string): Promise<void> {
    if (state.finished) return;
    state.finished = true;
    let result: RebuildResult;
    let closeMs: number | undefined;
    const counts = { pagesWritten: state.rebuilder.pagesWritten, slices: state.rebuilder.receivedSlices, duplicateSlices: state.duplicates };
    const closeStartMs = performance.now();
    try {
      // a live VM resumes on these files: they go to disk after it runs, not in its downtime
      state.store.close({ sync: state.vm === undefined });
      closeMs = Math.round(performance.now() - closeStartMs);
      if (failure) throw new Error(failure);
      const rebuiltHashes = { memory: state.rebuilder.imageDigest(0), disk: state.rebuilder.imageDigest(1) };
      result = verifiedResult(rebuiltHashes, state.sourceHashes!, counts, (performance.now() - state.startedMs) / 1000);
      if (!result.verified) state.store.discard();
      // a live VM's QEMU reopens its files by name when it resumes: renamed only after that
      else if (!state.vm) state.store.publish();
    } catch (err) {
      state.store.discard();
      result = failedResult(errorMessage(err), counts, (performance.now() - state.startedMs) / 1000);
    }
    state.log.info(result.verified ? 'images rebuilt and verified' : 'rebuild failed', { verified: result.verified, reason: result.reason, closeMs });
    state.span.setAttributes({ 'handoff.verified': result.verified, 'handoff.pages_written': result.pagesWritten, 'handoff.duplicate_slices': result.duplicateSlices });
    if (!result.verified) state.span.setStatus({ code: SpanStatusCode.ERROR, message: result.reason ?? 'not verified' });
    state.span.end();
    if (state.vm) await this.loadVm(state, result);
    state.link?.write(encodeJsonFrame(FrameType.Result, result));
    await this.ctx.publishEvent(state.migrationId, { type: 'result', result }).catch(() => undefined);
    // a live migration is reported once its VM runs (or could not be loaded)
    if (!result.vmReady) this.results.push({ migrationId: state.migrationId, result, ...this.pathsOf(state.migrationId) });
    // a long-running receiver keeps only the result of a finished migration, not its page maps
    this.states.delete(state.migrationId);
    this.finishedResults.set(state.migrationId, result);
    if (this.finishedResults.size > FINISHED_RESULTS_KEPT) this.finishedResults.delete(this.finishedResults.keys().next().value!);
  }

  /** Verified images: load the device state into the waiting VM; it resumes on the source's go. */
  private async loadVm(state: MigrationState, result: RebuildResult): Promise<void> {
    let resumer: DestinationVm | undefined;
    try {
      resumer = await state.vm!;
      if (!result.verified) throw new Error('images not verified');
      if (!state.deviceState) throw new Error('the final round carried no device state');
      await resumer.load(state.deviceState);
      result.vmReady = true;
      const vm = resumer;
      let reported = false;
      this.resumers.set(state.migrationId, {
        resume: async () => {
          const at = await vm.resume();
          if (result.resumedAtMs === undefined) {
            result.resumedAtMs = at;
            state.store.publish();
            state.store.syncPublished().catch((err: unknown) => state.log.warn('the rebuilt images could not be flushed to disk', { reason: errorMessage(err) }));
          }
          return at;
        },
        reportResumed: () => {
          if (reported) return;
          reported = true;
          this.results.push({ migrationId: state.migrationId, result, ...this.pathsOf(state.migrationId), vm: vm.info, ...(vm instanceof StreamResumer ? { feed: { ...vm.figures } } : {}) });
        },
      });
    } catch (err) {
      result.vmReady = false;
      result.vmError = `destination VM not resumed: ${errorMessage(err)}`;
      state.log.error('destination VM not resumed', { reason: errorMessage(err) });
      await resumer?.abort().catch(() => undefined);
      await state.vm?.then((v) => v.abort()).catch(() => undefined);
      state.store.discard();
    }
  }

  /** the receiver stops: unfinished migrations' images are discarded, their waiting VMs stopped */
  abandonUnfinished(): void {
    for (const s of this.states.values()) {
      if (s.finished) continue;
      s.store.discard();
      // a VM waiting for a handoff that will not finish here
      void s.vm?.then((v) => v.abort()).catch(() => undefined);
    }
  }
}
