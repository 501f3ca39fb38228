/**
 * Receiver actor (destination cloudlet): accepts the WAN link after checking the source's base is
 * ours, applies each chunk to the rebuilt images before acknowledging it, verifies the images by
 * hash and reports the result back over the link and on the destination's bus (stats, result).
 */
import { mkdirSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { hostname } from 'node:os';
import { loadBaseIndex } from '../../shared/base-index.js';
import { connectBus, publishEvent, type Bus } from '../../shared/bus.js';
import { decodeChunk, validateMigrationId } from '../../shared/codec.js';
import { MalformedMessageError, errorMessage } from '../../shared/errors.js';
import { createLogger, type Logger } from '../../shared/log.js';
import type { ImageDigests, RebuildResult, StageStats } from '../../shared/migration.js';
import { PAGE_SIZE } from '../../shared/pages.js';
import { FrameReader, FrameType, encodeAckFrame, encodeJsonFrame, parseAddress, parseJsonPayload, splitChunkFrame, type Captured, type Frame, type Hello } from '../../shared/wire.js';
import { statsSubject } from '../../shared/subjects.js';
import { Rebuilder } from './core.js';
import { FilePageStore } from './store.js';

export interface ReceiverOptions {
  listen: string;
  baseMemory: string;
  baseDisk: string;
  outDir: string;
  natsUrl: string;
  /** seconds to wait for the handshake of a new connection */
  helloTimeoutMs?: number;
}

export interface ReceivedMigration {
  migrationId: string;
  result: RebuildResult;
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
  const finishedIds = new Set<string>();
  const finished: ReceivedMigration[] = [];
  const waiters: ((r: ReceivedMigration) => void)[] = [];
  const memoryPath = join(options.outDir, 'memory.img');
  const diskPath = join(options.outDir, 'disk.img');

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
        state.store.publish();
        result = { verified: true, rebuiltHashes, ...base, rebuildSeconds };
      }
    } catch (err) {
      state.store.discard();
      result = { verified: false, reason: errorMessage(err), rebuiltHashes: { memory: '', disk: '' }, ...base, rebuildSeconds: (performance.now() - state.startedMs) / 1000 };
    }
    state.log.info(result.verified ? 'images rebuilt and verified' : 'rebuild failed', { verified: result.verified, reason: result.reason });
    state.link?.write(encodeJsonFrame(FrameType.Result, result));
    await publishEvent(bus, state.migrationId, { type: 'result', result }).catch(() => undefined);
    report({ migrationId: state.migrationId, result, memoryPath, diskPath });
    // a long-running receiver keeps only the id of a finished migration, not its page maps
    states.delete(state.migrationId);
    finishedIds.add(state.migrationId);
  };

  const checkDone = (state: MigrationState): void => {
    if (!state.finished && state.sourceHashes && state.rebuilder.complete) void finish(state);
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
      const r = state.rebuilder.apply(chunk);
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
      bus.nc.publish(statsSubject(state.migrationId, 'receiver'), JSON.stringify(stats));
      checkDone(state);
    } catch (err) {
      state.log.error('chunk rejected', { reason: errorMessage(err) });
      void finish(state, errorMessage(err));
    }
  };

  const sockets = new Set<Socket>();
  const handleConnection = (socket: Socket): void => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    const reader = new FrameReader();
    let state: MigrationState | undefined;
    let clog = log.child({ peer: `${socket.remoteAddress}:${socket.remotePort}` });
    const helloTimer = setTimeout(() => {
      clog.warn('no handshake: closing');
      socket.destroy();
    }, options.helloTimeoutMs ?? 10_000);
    const refuse = (reason: string): void => {
      clog.warn('refused', { reason });
      socket.end(encodeJsonFrame(FrameType.Refuse, { reason }));
    };
    const onHello = (frame: Frame): void => {
      clearTimeout(helloTimer);
      const hello = parseJsonPayload(frame) as Partial<Hello>;
      const migrationId = validateMigrationId(hello.migrationId);
      clog = clog.child({ migration: migrationId });
      const src = hello.baseHashes;
      if (!src || src.memory !== baseHashes.memory || src.disk !== baseHashes.disk) {
        refuse(
          `destination base differs from the source's: memory source ${src?.memory ?? '?'} destination ${baseHashes.memory}; disk source ${src?.disk ?? '?'} destination ${baseHashes.disk}`,
        );
        return;
      }
      if (hello.bytes?.memory !== memoryIndex.bytes || hello.bytes?.disk !== diskIndex.bytes) {
        refuse(`image sizes differ: source memory ${hello.bytes?.memory} disk ${hello.bytes?.disk}, destination base memory ${memoryIndex.bytes} disk ${diskIndex.bytes}`);
        return;
      }
      if (finishedIds.has(migrationId)) {
        refuse(`migration ${migrationId} has already finished here`);
        return;
      }
      state = states.get(migrationId);
      if (!state) {
        rmSync(memoryPath, { force: true });
        rmSync(diskPath, { force: true });
        const store = new FilePageStore([
          { base: options.baseMemory, out: memoryPath, bytes: memoryIndex.bytes },
          { base: options.baseDisk, out: diskPath, bytes: diskIndex.bytes },
        ]);
        state = { migrationId, log: clog, store, rebuilder: new Rebuilder(store, migrationId, [memoryIndex.hashes, diskIndex.hashes]), startedMs: performance.now(), duplicates: 0, finished: false };
        states.set(migrationId, state);
      }
      state.link = socket;
      clog.info('accepted');
      socket.write(encodeJsonFrame(FrameType.Accept, { baseHashes }));
    };
    const onFrame = async (frame: Frame): Promise<void> => {
      if (!state) {
        if (frame.type !== FrameType.Hello) throw new MalformedMessageError(`first frame is type ${frame.type}, expected a handshake`);
        onHello(frame);
        return;
      }
      if (frame.type === FrameType.Chunk) {
        const { frameNo, chunk } = splitChunkFrame(frame.payload);
        applyChunk(state, chunk);
        // acknowledged once applied: the sender acks its JetStream message only then
        socket.write(encodeAckFrame(frameNo));
      } else if (frame.type === FrameType.Captured) {
        const captured = parseJsonPayload(frame) as Captured;
        if (!Number.isInteger(captured.slices) || !Number.isInteger(captured.round) || typeof captured.imageHashes?.memory !== 'string') {
          throw new MalformedMessageError('captured frame: bad fields');
        }
        state.sourceHashes = captured.imageHashes;
        state.rebuilder.expect(captured.round, captured.slices);
        checkDone(state);
      } else {
        throw new MalformedMessageError(`unexpected frame type ${frame.type}`);
      }
    };
    // frames are handled in order: a chunk's ACK only after its durable publish
    let queue = Promise.resolve();
    let closing = false;
    const closeWithError = (err: unknown): void => {
      if (closing) return;
      closing = true;
      clog.error('bad frame: closing link', { reason: errorMessage(err) });
      socket.end(encodeJsonFrame(FrameType.Error, { reason: errorMessage(err) }));
      setTimeout(() => socket.destroy(), 1000).unref();
    };
    socket.on('data', (data: Buffer) => {
      if (closing) return;
      let frames: Frame[];
      try {
        frames = reader.push(data);
      } catch (err) {
        closeWithError(err);
        return;
      }
      for (const frame of frames) {
        queue = queue.then(() => (closing ? undefined : onFrame(frame))).catch(closeWithError);
      }
    });
    socket.on('error', (err) => clog.warn('link error', { reason: err.message }));
    socket.on('close', () => clearTimeout(helloTimer));
  };

  const { host, port } = parseAddress(options.listen, true);
  const server: Server = createServer(handleConnection);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
  const addr = server.address();
  const address = typeof addr === 'object' && addr ? { host: addr.address, port: addr.port } : { host, port };
  log.info('listening', { address: `${address.host}:${address.port}`, baseMemory: baseHashes.memory.slice(0, 16), baseDisk: baseHashes.disk.slice(0, 16) });

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
      for (const s of states.values()) if (!s.finished) s.store.discard();
      await bus.close();
    },
  };
}
