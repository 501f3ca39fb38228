/**
 * Receiver actor (destination cloudlet): accepts the WAN link after checking the source's base is
 * ours, applies each chunk to the rebuilt images before acknowledging it, verifies the images by
 * hash and reports the result back over the link and on the destination's bus (stats, result).
 */
import { mkdirSync, rmSync } from 'node:fs';
import type { Server, Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { hostname } from 'node:os';
import { loadBaseIndex } from '../../shared/image/base-index.js';
import { SpanStatusCode, type Span } from '@opentelemetry/api';
import { connectBus, publishEvent, publishStats, type Bus } from '../../shared/bus/bus.js';
import { decodeChunk, validateMigrationId } from '../../shared/wire/chunk-codec.js';
import { MalformedMessageError, errorMessage } from '../../shared/model/errors.js';
import { createLinkServer, linkSecurityFromEnv, type LinkSecurity } from '../../shared/wire/link-security.js';
import { createLogger, type Logger } from '../../shared/telemetry/log.js';
import type { ImageDigests, RebuildResult, StageStats } from '../../shared/model/migration.js';
import { PAGE_SIZE } from '../../shared/image/pages.js';
import { FrameReader, FrameType, encodeAckFrame, encodeJsonFrame, encodeProgressFrame, parseAddress, parseCaptured, parseHello, splitChunkFrame, encodeResumedFrame, encodeProbeAckFrame, probeIdOf, MAX_APPLIED_FRAMES, type Accept, type Frame, type LinkError, type ProbeArrival } from '../../shared/wire/frames.js';
import { chunkTraced, startSpan, traceparentOf } from '../../shared/telemetry/telemetry.js';
import { ArrivalTimer } from './arrival.js';
import { Rebuilder } from './core.js';
import { FilePageStore } from './store.js';
import { VmResumer, type ResumeOptions, type ResumedVm } from './resume.js';

export interface ReceiverOptions {
  listen: string;
  baseMemory: string;
  baseDisk: string;
  outDir: string;
  natsUrl: string;
  /** milliseconds to wait for the handshake of a new connection */
  helloTimeoutMs?: number;
  /** the link's credentials (default: from the environment, see shared/wire/link-security.ts) */
  security?: LinkSecurity;
  /** each migration's images in OUT/<migrationId>/ (a receiver serving many), else OUT/ */
  perMigrationDirs?: boolean;
  /** live handoffs: resume the VM here (without: refused) */
  vm?: ResumeOptions;
  /** a connection that brings nothing for this long is closed (default 120 s) */
  idleTimeoutMs?: number;
}

export interface ReceivedMigration {
  migrationId: string;
  result: RebuildResult;
  /** live: the VM running here now */
  vm?: ResumedVm;
  memoryPath: string;
  diskPath: string;
}

interface MigrationState {
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
  vm?: Promise<VmResumer>;
  deviceState?: string;
  /** the rebuild's span (a child of the sender's link span) and which chunks get their own */
  span: Span;
  traceEveryChunks: number | undefined;
}

export interface RunningReceiver {
  address: { host: string; port: number };
  baseHashes: ImageDigests;
  /** each migration's outcome, in order */
  results: AsyncIterable<ReceivedMigration>;
  /** resolves with the first migration that finishes (success or not) */
  next(): Promise<ReceivedMigration>;
  stop(): Promise<void>;
}

export async function startReceiver(options: ReceiverOptions): Promise<RunningReceiver> {
  const instance = `${hostname()}:${process.pid}`;
  const log = createLogger({ stage: 'receiver', instance });
  const [memoryIndex, diskIndex] = await Promise.all([loadBaseIndex(options.baseMemory), loadBaseIndex(options.baseDisk)]);
  const baseHashes: ImageDigests = { memory: memoryIndex.contentHash, disk: diskIndex.contentHash };
  mkdirSync(options.outDir, { recursive: true });
  const bus: Bus = await connectBus(options.natsUrl, 'handoff-receiver');
  const states = new Map<string, MigrationState>();
  /** finished migrations' results, for a source that reconnects after the result was sent (bounded) */
  const finishedResults = new Map<string, RebuildResult>();
  /** live migrations whose VM is loaded: the source's go resumes it (once, however often asked) */
  const resumers = new Map<string, { resume(): Promise<number>; reportResumed(): void }>();
  const finished: ReceivedMigration[] = [];
  const waiters: ((r: ReceivedMigration) => void)[] = [];
  /** where a migration's images go: OUT/ for one-shot use, OUT/<migrationId>/ for a serving receiver */
  const pathsOf = (migrationId: string): { memoryPath: string; diskPath: string } => {
    const dir = options.perMigrationDirs ? join(options.outDir, migrationId) : options.outDir;
    return { memoryPath: join(dir, 'memory.img'), diskPath: join(dir, 'disk.img') };
  };

  const report = (r: ReceivedMigration): void => {
    const w = waiters.shift();
    if (w) w(r);
    else finished.push(r);
  };

  const finish = async (state: MigrationState, failure?: string): Promise<void> => {
    if (state.finished) return;
    state.finished = true;
    let result: RebuildResult;
    const base = { pagesWritten: state.rebuilder.pagesWritten, slices: state.rebuilder.receivedSlices, duplicateSlices: state.duplicates };
    try {
      state.store.close();
      if (failure) throw new Error(failure);
      const rebuiltHashes = { memory: state.rebuilder.imageDigest(0), disk: state.rebuilder.imageDigest(1) };
      const src = state.sourceHashes!;
      const mismatch = (['memory', 'disk'] as const).filter((k) => rebuiltHashes[k] !== src[k]);
      const rebuildSeconds = (performance.now() - state.startedMs) / 1000;
      if (mismatch.length > 0) {
        state.store.discard();
        result = { verified: false, reason: `rebuilt ${mismatch.join(' and ')} image hash differs from the source's (${mismatch.map((k) => `${k}: source ${src[k]}, rebuilt ${rebuiltHashes[k]}`).join('; ')})`, rebuiltHashes, ...base, rebuildSeconds };
      } else {
        // a live VM's QEMU reopens its files by name when it resumes: renamed only after that
        if (!state.vm) state.store.publish();
        result = { verified: true, rebuiltHashes, ...base, rebuildSeconds };
      }
    } catch (err) {
      state.store.discard();
      result = { verified: false, reason: errorMessage(err), rebuiltHashes: { memory: '', disk: '' }, ...base, rebuildSeconds: (performance.now() - state.startedMs) / 1000 };
    }
    state.log.info(result.verified ? 'images rebuilt and verified' : 'rebuild failed', { verified: result.verified, reason: result.reason });
    state.span.setAttributes({ 'handoff.verified': result.verified, 'handoff.pages_written': result.pagesWritten, 'handoff.duplicate_slices': result.duplicateSlices });
    if (!result.verified) state.span.setStatus({ code: SpanStatusCode.ERROR, message: result.reason ?? 'not verified' });
    state.span.end();
    if (state.vm) await loadVm(state, result);
    state.link?.write(encodeJsonFrame(FrameType.Result, result));
    await publishEvent(bus, state.migrationId, { type: 'result', result }).catch(() => undefined);
    // a live migration is reported once its VM runs (or could not be loaded)
    if (!result.vmReady) report({ migrationId: state.migrationId, result, ...pathsOf(state.migrationId) });
    // a long-running receiver keeps only the result of a finished migration, not its page maps
    states.delete(state.migrationId);
    finishedResults.set(state.migrationId, result);
    if (finishedResults.size > 256) finishedResults.delete(finishedResults.keys().next().value!);
  };

  const checkDone = (state: MigrationState): void => {
    if (!state.finished && state.final && state.sourceHashes && state.rebuilder.complete) void finish(state);
  };

  /** Verified images: load the device state into the waiting VM; it resumes on the source's go. */
  const loadVm = async (state: MigrationState, result: RebuildResult): Promise<void> => {
    let resumer: VmResumer | undefined;
    try {
      resumer = await state.vm!;
      if (!result.verified) throw new Error('images not verified');
      if (!state.deviceState) throw new Error('the final round carried no device state');
      await resumer.load(state.deviceState);
      result.vmReady = true;
      const vm = resumer;
      let reported = false;
      resumers.set(state.migrationId, {
        resume: async () => {
          const at = await vm.resume();
          if (result.resumedAtMs === undefined) {
            result.resumedAtMs = at;
            state.store.publish();
          }
          return at;
        },
        reportResumed: () => {
          if (reported) return;
          reported = true;
          report({ migrationId: state.migrationId, result, ...pathsOf(state.migrationId), vm: vm.info });
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
  };

  /**
   * Chunks are applied as they come off the link, with no bus hop: the rebuilt images are the
   * destination's state, and a chunk not acknowledged is still in the source's wire queue.
   */
  const applyChunk = (state: MigrationState, bytes: Uint8Array): void => {
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
      const stats: StageStats = {
        stage: 'receiver',
        instance,
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
      };
      publishStats(bus, stats);
      checkDone(state);
    } catch (err) {
      state.log.error('chunk rejected', { reason: errorMessage(err) });
      void finish(state, errorMessage(err));
    }
  };

  const sockets = new Set<Socket>();
  const handleConnection = (socket: Socket): void => {
    sockets.add(socket);
    const reader = new FrameReader();
    const arrivals = new ArrivalTimer();
    let readThisTurn = false;
    let state: MigrationState | undefined;
    /** the migration this connection's handshake named (also one that has finished: its go may come) */
    let migrationOfLink: string | undefined;
    let clog = log.child({ peer: `${socket.remoteAddress}:${socket.remotePort}` });
    const helloTimer = setTimeout(() => {
      clog.warn('no handshake: closing');
      socket.destroy();
    }, options.helloTimeoutMs ?? 10_000);
    // tells the source every second how much arrived, so it can tell a slow link from a dead one
    let receivedBytes = 0;
    let lastReported = -1;
    let idleSince = performance.now();
    const progress = setInterval(() => {
      if (receivedBytes !== lastReported) {
        lastReported = receivedBytes;
        idleSince = performance.now();
        if (state) socket.write(encodeProgressFrame(receivedBytes));
      } else if (performance.now() - idleSince > (options.idleTimeoutMs ?? 120_000)) {
        clog.warn('link idle: closing');
        socket.destroy();
      }
    }, 1000);
    socket.once('close', () => {
      sockets.delete(socket);
      clearInterval(progress);
      clearTimeout(helloTimer);
    });
    const refuse = (reason: string): void => {
      clog.warn('refused', { reason });
      socket.end(encodeJsonFrame(FrameType.Refuse, { reason }));
    };
    const onHello = (frame: Frame): void => {
      clearTimeout(helloTimer);
      const hello = parseHello(frame);
      const migrationId = hello.migrationId;
      clog = clog.child({ migration: migrationId });
      const src = hello.baseHashes;
      if (src.memory !== baseHashes.memory || src.disk !== baseHashes.disk) {
        refuse(`destination base differs from the source's: memory source ${src.memory} destination ${baseHashes.memory}; disk source ${src.disk} destination ${baseHashes.disk}`);
        return;
      }
      if (hello.bytes.memory !== memoryIndex.bytes || hello.bytes.disk !== diskIndex.bytes) {
        refuse(`image sizes differ: source memory ${hello.bytes.memory} disk ${hello.bytes.disk}, destination base memory ${memoryIndex.bytes} disk ${diskIndex.bytes}`);
        return;
      }
      if (hello.vm && !options.vm) {
        refuse('this destination cannot resume VMs (start it with --resume-vm, the base VM\'s kernel, initrd and device state)');
        return;
      }
      if (hello.vm && hello.vm.memoryBytes !== memoryIndex.bytes) {
        refuse(`the VM has ${hello.vm.memoryBytes} bytes of memory, the base memory image ${memoryIndex.bytes}`);
        return;
      }
      migrationOfLink = migrationId;
      const done = finishedResults.get(migrationId);
      if (done) {
        // the source lost the link after we finished: it gets the result again
        clog.info('reconnected after the result: sending it again');
        socket.write(encodeJsonFrame(FrameType.Accept, { baseHashes }));
        socket.write(encodeJsonFrame(FrameType.Result, done));
        return;
      }
      state = states.get(migrationId);
      if (!state) {
        const { memoryPath, diskPath } = pathsOf(migrationId);
        mkdirSync(dirname(memoryPath), { recursive: true });
        rmSync(memoryPath, { force: true });
        rmSync(diskPath, { force: true });
        const store = new FilePageStore([
          { base: options.baseMemory, out: memoryPath, bytes: memoryIndex.bytes },
          { base: options.baseDisk, out: diskPath, bytes: diskIndex.bytes },
        ]);
        state = { migrationId, log: clog, store, rebuilder: new Rebuilder(store, migrationId, [memoryIndex.hashes, diskIndex.hashes]), startedMs: performance.now(), duplicates: 0, finished: false, appliedFrames: [],
          span: startSpan('receive', hello.traceparent, { 'handoff.actor': 'receiver', 'handoff.migration': migrationId }),
          traceEveryChunks: hello.traceEveryChunks,
          final: false,
        };
        if (hello.vm && options.vm) {
          // started now, on the images being rebuilt: its start-up is not downtime
          const files = { memory: `${memoryPath}.partial`, disk: `${diskPath}.partial` };
          const st = state;
          st.vm = VmResumer.prepare(hello.vm, options.vm, files, dirname(memoryPath), clog);
          st.vm.catch((err: unknown) => clog.error('destination VM did not start', { reason: errorMessage(err) }));
        }
        states.set(migrationId, state);
        clog.info('accepted');
      } else {
        // the source resumes after a drop: the new connection replaces the old one
        if (state.link && state.link !== socket) state.link.destroy();
        clog.info('source reconnected: resuming', { slicesApplied: state.rebuilder.receivedSlices });
      }
      state.link = socket;
      // the same sender link resuming learns which of its frames were applied already
      const sameLink = hello.linkId !== undefined && hello.linkId === state.linkId;
      if (!sameLink) state.appliedFrames = [];
      state.linkId = hello.linkId;
      const accept: Accept = { baseHashes, ...(sameLink ? { appliedFrames: state.appliedFrames } : {}) };
      socket.write(encodeJsonFrame(FrameType.Accept, accept));
    };
    const onFrame = async (frame: Frame, probeArrival?: ProbeArrival): Promise<void> => {
      if (frame.type === FrameType.Go && migrationOfLink) {
        const resumer = resumers.get(migrationOfLink);
        if (!resumer) throw new MalformedMessageError(`go for migration ${migrationOfLink}, which has no VM ready to resume`);
        const at = await resumer.resume();
        // the source hears it before this receiver may stop (receive without --serve exits then)
        await new Promise<void>((resolve) => socket.write(encodeResumedFrame(at), () => resolve()));
        resumer.reportResumed();
        return;
      }
      if (!state) {
        if (frame.type !== FrameType.Hello) throw new MalformedMessageError(`first frame is type ${frame.type}, expected a handshake`);
        onHello(frame);
        return;
      }
      if (frame.type === FrameType.Chunk) {
        const { frameNo, chunk } = splitChunkFrame(frame.payload);
        applyChunk(state, chunk);
        state.appliedFrames.push(frameNo);
        if (state.appliedFrames.length > MAX_APPLIED_FRAMES) state.appliedFrames.splice(0, state.appliedFrames.length - MAX_APPLIED_FRAMES);
        // acknowledged once applied (or found applied already): the sender acks its JetStream message only then
        socket.write(encodeAckFrame(frameNo));
      } else if (frame.type === FrameType.Probe) {
        socket.write(encodeProbeAckFrame(probeIdOf(frame), probeArrival ?? { bytes: 0, spanMs: 0 }));
      } else if (frame.type === FrameType.Captured) {
        const captured = parseCaptured(frame);
        state.sourceHashes = captured.imageHashes;
        state.rebuilder.expect(captured.round, captured.slices);
        if (captured.final !== false) state.final = true;
        if (captured.deviceState) state.deviceState = captured.deviceState;
        checkDone(state);
      } else {
        throw new MalformedMessageError(`unexpected frame type ${frame.type}`);
      }
    };
    // frames are handled in order: a chunk's ACK only after it is applied
    let queue = Promise.resolve();
    let closing = false;
    const closeWithError = (err: unknown, resumable: boolean): void => {
      if (closing) return;
      closing = true;
      const reason = errorMessage(err);
      clog.error(resumable ? 'corrupted frame: closing link, the source resends' : 'bad frame: closing link', { reason });
      const e: LinkError = { reason, resumable };
      socket.end(encodeJsonFrame(FrameType.Error, e));
      setTimeout(() => socket.destroy(), 1000).unref();
    };
    socket.on('data', (data: Buffer) => {
      if (closing) return;
      receivedBytes += data.byteLength;
      arrivals.read(data.byteLength, performance.now(), readThisTurn);
      if (!readThisTurn) {
        readThisTurn = true;
        setImmediate(() => (readThisTurn = false));
      }
      let frames: Frame[];
      try {
        frames = reader.push(data);
      } catch (err) {
        // framing or checksum: damaged in transit (or not a handoff peer); a source resumes and resends
        closeWithError(err, state !== undefined);
        return;
      }
      for (const frame of frames) {
        // timed now, at its arrival; answered in turn
        const probeArrival = frame.type === FrameType.Probe ? arrivals.probeFinished() : undefined;
        queue = queue.then(() => (closing ? undefined : onFrame(frame, probeArrival))).catch((err: unknown) => closeWithError(err, false));
      }
    });
    socket.on('error', (err) => clog.warn('link error', { reason: err.message }));
  };

  const { host, port } = parseAddress(options.listen, true);
  const security = options.security ?? linkSecurityFromEnv();
  const server: Server = createLinkServer(security, handleConnection, (peer, reason) => log.warn('peer refused', { peer, reason }));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
  const addr = server.address();
  const address = typeof addr === 'object' && addr ? { host: addr.address, port: addr.port } : { host, port };
  log.info('listening', { address: `${address.host}:${address.port}`, link: security.kind, baseMemory: baseHashes.memory.slice(0, 16), baseDisk: baseHashes.disk.slice(0, 16) });

  const next = (): Promise<ReceivedMigration> => {
    const r = finished.shift();
    return r ? Promise.resolve(r) : new Promise((resolve) => waiters.push(resolve));
  };
  return {
    address,
    baseHashes,
    next,
    results: {
      async *[Symbol.asyncIterator]() {
        for (;;) yield await next();
      },
    },
    stop: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      for (const s of states.values()) {
        if (s.finished) continue;
        s.store.discard();
        // a VM waiting for a handoff that will not finish here
        void s.vm?.then((v) => v.abort()).catch(() => undefined);
      }
      await bus.close();
    },
  };
}
