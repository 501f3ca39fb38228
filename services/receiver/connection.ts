/**
 * One connection of the WAN link: its handshake, then its frames in order (a chunk's ACK only after
 * it is applied), the progress it reports every second, and its end on a bad frame or an idle link.
 */
import type { Socket } from 'node:net';
import { MalformedMessageError, errorMessage } from '../../shared/model/errors.js';
import type { Logger } from '../../shared/telemetry/log.js';
import {
  FrameReader,
  FrameType,
  encodeAckFrame,
  encodeJsonFrame,
  encodeProbeAckFrame,
  encodeProgressFrame,
  encodeResumedFrame,
  parseCaptured,
  parseHello,
  probeIdOf,
  splitChunkFrame,
  type Frame,
  type LinkError,
  type ProbeArrival,
} from '../../shared/wire/frames.js';
import { ArrivalTimer } from './arrival.js';
import { attachLink, recordApplied, type MigrationState, type Migrations } from './migration.js';
import { refusalOf, type Destination } from './verify.js';

export interface ConnectionSettings {
  destination: Destination;
  /** milliseconds to wait for the handshake of a new connection */
  helloTimeoutMs: number;
  /** a connection that brings nothing for this long is closed */
  idleTimeoutMs: number;
}

/** how often the source hears how much arrived, so it can tell a slow link from a dead one */
const PROGRESS_EVERY_MS = 1000;

export function handleConnection(socket: Socket, migrations: Migrations, settings: ConnectionSettings, log: Logger): void {
  const { destination } = settings;
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
  }, settings.helloTimeoutMs);
  let receivedBytes = 0;
  let lastReported = -1;
  let idleSince = performance.now();
  const progress = setInterval(() => {
    if (receivedBytes !== lastReported) {
      lastReported = receivedBytes;
      idleSince = performance.now();
      if (state) socket.write(encodeProgressFrame(receivedBytes));
    } else if (performance.now() - idleSince > settings.idleTimeoutMs) {
      clog.warn('link idle: closing');
      socket.destroy();
    }
  }, PROGRESS_EVERY_MS);
  socket.once('close', () => {
    clearInterval(progress);
    clearTimeout(helloTimer);
  });

  const onHello = (frame: Frame): void => {
    clearTimeout(helloTimer);
    const hello = parseHello(frame);
    const migrationId = hello.migrationId;
    clog = clog.child({ migration: migrationId });
    const refusal = refusalOf(hello, destination);
    if (refusal !== undefined) {
      clog.warn('refused', { reason: refusal });
      socket.end(encodeJsonFrame(FrameType.Refuse, { reason: refusal }));
      return;
    }
    migrationOfLink = migrationId;
    const done = migrations.finishedResult(migrationId);
    if (done) {
      // the source lost the link after we finished: it gets the result again
      clog.info('reconnected after the result: sending it again');
      socket.write(encodeJsonFrame(FrameType.Accept, { baseHashes: destination.baseHashes }));
      socket.write(encodeJsonFrame(FrameType.Result, done));
      return;
    }
    state = migrations.get(migrationId);
    if (!state) {
      state = migrations.open(hello, clog);
      clog.info('accepted');
    } else {
      // the source resumes after a drop: the new connection replaces the old one
      if (state.link && state.link !== socket) state.link.destroy();
      clog.info('source reconnected: resuming', { slicesApplied: state.rebuilder.receivedSlices });
    }
    socket.write(encodeJsonFrame(FrameType.Accept, attachLink(state, socket, hello.linkId, destination.baseHashes)));
  };

  const onFrame = async (frame: Frame, probeArrival?: ProbeArrival): Promise<void> => {
    if (frame.type === FrameType.Go && migrationOfLink) {
      const resumer = migrations.resumer(migrationOfLink);
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
    if (frame.type !== FrameType.Probe) {
      // the rebuilt images start as copies of the base, made while the link opened
      const failed = await state.store.ready.then(
        () => undefined,
        (err: unknown) => errorMessage(err),
      );
      if (failed !== undefined) return void (await migrations.finish(state, failed));
    }
    if (frame.type === FrameType.Chunk) {
      const { frameNo, chunk } = splitChunkFrame(frame.payload);
      migrations.applyChunk(state, chunk);
      recordApplied(state, frameNo);
      // acknowledged once applied (or found applied already): the sender acks its JetStream message only then
      socket.write(encodeAckFrame(frameNo));
    } else if (frame.type === FrameType.Probe) {
      socket.write(encodeProbeAckFrame(probeIdOf(frame), probeArrival ?? { bytes: 0, spanMs: 0 }));
    } else if (frame.type === FrameType.Captured) {
      migrations.captured(state, parseCaptured(frame));
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
}
