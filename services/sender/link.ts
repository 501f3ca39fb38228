/**
 * The source end of the WAN link: an authenticated connection, paced chunk frames the receiver
 * acknowledges, and the result. Resumable: when the connection drops, or carries nothing back for
 * a while, or the receiver reports a corrupted frame, the link reconnects with backoff and sends
 * again every frame not yet acknowledged (the receiver ignores what it has already applied), until
 * a give-up deadline.
 */
import { randomBytes } from 'node:crypto';
import type { Socket } from 'node:net';
import { MalformedMessageError, RefusedError, errorMessage } from '../../shared/model/errors.js';
import { LinkAuthError, dialLink, type LinkSecurity } from '../../shared/wire/link-security.js';
import type { Logger } from '../../shared/telemetry/log.js';
import type { ImageDigests, RebuildResult } from '../../shared/model/migration.js';
import {
  FrameReader,
  FrameType,
  encodeChunkFrame,
  encodeFrame,
  encodeJsonFrame,
  parseAccept,
  parseAddress,
  parseLinkError,
  parseProgressFrame,
  parseReason,
  parseResult,
  parseResumed,
  encodeProbeFrame,
  parseProbeAck,
  type ProbeArrival,
  splitChunkFrame,
  type Captured,
  type Frame,
  type Hello,
} from '../../shared/wire/frames.js';
import { runQueueWaitMs } from '../../shared/cpu/thread-cpu.js';
import { BandwidthEstimator } from './bandwidth.js';
import { probeRound } from './link-probe.js';
import { PendingFrames, type SentChunk } from './pending-frames.js';
import { RateLimiter } from './rate.js';

export type { SentChunk } from './pending-frames.js';

export interface LinkOptions {
  address: string;
  hello: Hello;
  security: LinkSecurity;
  /** sender's rate cap, 0 = none */
  rateCapBps: number;
  /** how long a lost link may take to come back before the migration fails */
  deadlineMs?: number;
  /** unacknowledged frames and nothing heard from the receiver for this long: the link is dead */
  silenceMs?: number;
  handshakeTimeoutMs?: number;
  log?: Logger;
}

/** A link failure that no reconnection can mend (not authenticated, a bad peer). */
class FatalLinkError extends Error {}

/** The destination's own answer that it cannot go on (an ERROR frame, not a lost link). */
export class DestinationError extends FatalLinkError {
  override name = 'DestinationError';
}

interface Connection {
  socket: Socket;
  /** when the receiver last showed progress (an ACK, or more bytes received) */
  lastProgressMs: number;
  receivedBytes: number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class WanLink {
  readonly bandwidth = new BandwidthEstimator();
  /** bytes written to the network, resends included */
  wireBytes = 0;
  /** bytes of chunk frames written more than once */
  resentBytes = 0;
  reconnects = 0;
  private reportedReconnects = 0;
  private firstSendMs: number | undefined;
  private frameNo = 0;
  private readonly pending = new PendingFrames<Connection>();
  private readonly capturedFrames: Buffer[] = [];
  private readonly limiter: RateLimiter | undefined;
  private readonly deadlineMs: number;
  private readonly silenceMs: number;
  private readonly handshakeTimeoutMs: number;
  private conn: Connection | undefined;
  /** resolves when a connection is up again after a drop */
  private reconnected: Promise<void> | undefined;
  private resuming = false;
  /** the destination has given its last answer */
  private done = false;
  private failure: Error | undefined;
  private closed = false;
  private resultHandlers: { resolve: (r: RebuildResult) => void; reject: (e: Error) => void } | undefined;
  readonly result: Promise<RebuildResult>;
  private readonly watchdog: NodeJS.Timeout;

  private readonly hello: Hello;

  private constructor(private readonly options: LinkOptions) {
    this.hello = { ...options.hello, linkId: randomBytes(8).toString('hex') };
    this.limiter = options.rateCapBps > 0 ? new RateLimiter(options.rateCapBps) : undefined;
    this.deadlineMs = options.deadlineMs ?? 60_000;
    this.silenceMs = options.silenceMs ?? 4_000;
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? 15_000;
    this.result = new Promise((resolve, reject) => {
      this.resultHandlers = { resolve, reject };
    });
    this.result.catch(() => undefined);
    this.watchdog = setInterval(() => this.checkAlive(), 250);
    this.watchdog.unref();
  }

  /** Connects and shakes hands; rejects with RefusedError when the destination refuses. */
  static async open(options: LinkOptions): Promise<{ link: WanLink; destinationBaseHashes: ImageDigests }> {
    const link = new WanLink(options);
    try {
      const { conn, destinationBaseHashes } = await link.connect();
      link.conn = conn;
      return { link, destinationBaseHashes };
    } catch (err) {
      clearInterval(link.watchdog);
      link.closed = true;
      throw err instanceof FatalLinkError || err instanceof RefusedError ? err : new Error(`cannot reach destination ${options.address}: ${errorMessage(err)}`);
    }
  }

  /** One connection: dial, authenticate, HELLO, wait for ACCEPT (or REFUSE). */
  private async connect(): Promise<{ conn: Connection; destinationBaseHashes: ImageDigests; appliedFrames: number[] }> {
    const { host, port } = parseAddress(this.options.address);
    let socket: Socket;
    try {
      socket = await dialLink(host, port, this.options.security, this.handshakeTimeoutMs);
    } catch (err) {
      throw err instanceof LinkAuthError ? new FatalLinkError(`WAN link to ${this.options.address}: ${err.message}`) : err;
    }
    const conn: Connection = { socket, lastProgressMs: performance.now(), receivedBytes: 0 };
    const reader = new FrameReader();
    return new Promise((resolve, reject) => {
      let accepted = false;
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`destination ${this.options.address} did not answer the handshake within ${this.handshakeTimeoutMs / 1000} s`));
      }, this.handshakeTimeoutMs);
      const lost = (err: Error): void => {
        clearTimeout(timer);
        if (!accepted) {
          socket.destroy();
          reject(err);
        } else this.onDrop(conn, err);
      };
      socket.on('data', (data: Buffer) => {
        let frames: Frame[];
        try {
          frames = reader.push(data);
        } catch (err) {
          // the destination's own frames arrive corrupted: treat as a drop, the next connection resends
          lost(err as Error);
          return;
        }
        for (const frame of frames) {
          try {
            if (!accepted) {
              if (frame.type === FrameType.Accept) {
                accepted = true;
                clearTimeout(timer);
                const accept = parseAccept(frame);
                resolve({ conn, destinationBaseHashes: accept.baseHashes, appliedFrames: accept.appliedFrames ?? [] });
              } else if (frame.type === FrameType.Refuse) {
                const reason = parseReason(frame, 'refuse');
                clearTimeout(timer);
                socket.destroy();
                reject(new RefusedError(reason));
                return;
              } else if (frame.type === FrameType.Error) {
                const e = parseLinkError(frame);
                lost(e.resumable ? new Error(`destination: ${e.reason}`) : new DestinationError(`destination: ${e.reason}`));
                return;
              } else throw new MalformedMessageError(`frame type ${frame.type} before the handshake's answer`);
            } else this.onFrame(conn, frame);
          } catch (err) {
            lost(err instanceof FatalLinkError ? err : new FatalLinkError(`destination sent a bad frame: ${errorMessage(err)}`));
            return;
          }
        }
      });
      socket.on('error', (err) => lost(new Error(`WAN link to ${this.options.address}: ${err.message}`)));
      socket.on('close', () => {
        // TLS 1.3 completes the client's side before the server checks its certificate: a refusal
        // then shows only as a close before ACCEPT
        const why = !accepted && this.options.security.kind !== 'insecure' ? ' before accepting the handshake: authentication failed? (the destination did not accept our link credentials)' : '';
        lost(new Error(`WAN link to ${this.options.address} closed${why}`));
      });
      socket.write(encodeJsonFrame(FrameType.Hello, this.hello));
    });
  }

  private onFrame(conn: Connection, frame: Frame): void {
    switch (frame.type) {
      case FrameType.Ack: {
        const { frameNo } = splitChunkFrame(frame.payload);
        conn.lastProgressMs = performance.now();
        // undefined: the ACK of a copy already acknowledged, harmless
        const acked = this.pending.acknowledge(frameNo);
        if (acked) this.bandwidth.ack(acked.bytes, acked.sentMs ?? performance.now());
        return;
      }
      case FrameType.Progress: {
        const received = parseProgressFrame(frame.payload);
        if (received > conn.receivedBytes) {
          conn.receivedBytes = received;
          conn.lastProgressMs = performance.now();
        }
        return;
      }
      case FrameType.Result: {
        const result = parseResult(frame);
        // nothing more to say over this link unless a VM waits for the go
        if (!result.vmReady) this.done = true;
        this.resultHandlers?.resolve(result);
        return;
      }
      case FrameType.ProbeAck: {
        const { id, ...arrival } = parseProbeAck(frame);
        this.probes.get(id)?.(arrival);
        return;
      }
      case FrameType.Resumed:
        this.done = true;
        this.resumed?.resolve(parseResumed(frame));
        return;
      case FrameType.Error: {
        const e = parseLinkError(frame);
        if (e.resumable) this.onDrop(conn, new Error(`destination: ${e.reason}`));
        else this.fail(new DestinationError(`destination: ${e.reason}`));
        return;
      }
      default:
        throw new MalformedMessageError(`unexpected frame type ${frame.type} from the destination`);
    }
  }

  /** A silent link with frames outstanding is dead even if TCP has not noticed (a cut cable). */
  private checkAlive(): void {
    const conn = this.conn;
    if (!conn || this.pending.size === 0) return;
    if (performance.now() - conn.lastProgressMs > this.silenceMs) {
      this.onDrop(conn, new Error(`nothing heard from the destination for ${this.silenceMs / 1000} s with frames outstanding`));
    }
  }

  private onDrop(conn: Connection, err: Error): void {
    if (this.conn !== conn) return; // an old connection's late news
    this.conn = undefined;
    conn.socket.destroy();
    this.releaseDrain?.();
    // a destination that has answered everything may close the link: nothing to resume
    if (this.closed || this.failure || this.done) return;
    if (err instanceof FatalLinkError) {
      this.fail(err);
      return;
    }
    if (this.resuming) return; // the resume under way notices: its writes fail and it dials again
    this.options.log?.warn('WAN link lost: reconnecting', { reason: err.message, unacknowledgedFrames: this.pending.size });
    this.resuming = true;
    this.reconnected = this.resume(err).finally(() => {
      this.resuming = false;
      this.reconnected = undefined;
    });
  }

  /** Reconnects with backoff, then sends again what went to a lost connection unacknowledged. */
  private async resume(cause: Error): Promise<void> {
    const lostAt = performance.now();
    let lastError = cause;
    for (let attempt = 0; ; attempt++) {
      await sleep(Math.min(2000, 100 * 2 ** attempt));
      if (this.closed || this.failure) return;
      if (performance.now() - lostAt > this.deadlineMs) {
        this.fail(new Error(`WAN link to ${this.options.address} lost and not back within ${this.deadlineMs / 1000} s (last error: ${lastError.message})`));
        return;
      }
      try {
        const { conn, appliedFrames } = await this.connect();
        this.conn = conn;
        this.reconnects++;
        // applied before the drop, their ACKs lost with it: done, nothing to resend
        for (const frameNo of appliedFrames) this.pending.acknowledge(frameNo);
        const frames = this.pending.sentBefore(conn);
        this.options.log?.info('WAN link back: resending unacknowledged frames', { attempt: attempt + 1, frames: frames.length, downSeconds: Number(((performance.now() - lostAt) / 1000).toFixed(1)) });
        for (const f of this.capturedFrames) await this.writeNow(conn, f);
        if (this.goFrame) await this.writeNow(conn, this.goFrame);
        for (const f of frames) {
          if (!this.pending.has(f.frameNo)) continue; // acknowledged meanwhile
          await this.limiter?.take(f.bytes);
          this.pending.markSent(f, conn);
          this.resentBytes += f.bytes;
          await this.writeNow(conn, f.pieces);
        }
        return;
      } catch (err) {
        lastError = err as Error;
        if (err instanceof FatalLinkError || err instanceof RefusedError) {
          this.fail(err);
          return;
        }
        const conn = this.conn;
        this.conn = undefined;
        conn?.socket.destroy();
      }
    }
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    clearInterval(this.watchdog);
    this.pending.rejectAll(err);
    this.resultHandlers?.reject(err);
    this.resumed?.reject(err);
    this.conn?.socket.destroy();
    this.conn = undefined;
    this.releaseDrain?.(); // a destroyed socket never drains: let waiting writers see the failure
  }

  /** set while the socket's buffer is full: writers wait for one shared 'drain' */
  private drained: Promise<void> | undefined;
  private releaseDrain: (() => void) | undefined;

  /** The current connection, once one is up again if it is being re-established. */
  private async connection(): Promise<Connection> {
    while (this.reconnected) await this.reconnected;
    if (this.failure) throw this.failure;
    if (!this.conn) throw new Error('WAN link closed');
    return this.conn;
  }

  /** Writes a control frame to the current connection. */
  private async write(frame: Buffer | readonly Uint8Array[]): Promise<void> {
    await this.writeNow(await this.connection(), frame);
  }

  private async writeNow(conn: Connection, frame: Buffer | readonly Uint8Array[]): Promise<void> {
    while (this.drained) await this.drained;
    if (this.conn !== conn) throw new Error('WAN link dropped while writing');
    const pieces = Buffer.isBuffer(frame) ? [frame] : frame;
    conn.socket.cork();
    let flushed = true;
    for (const piece of pieces) {
      this.wireBytes += piece.byteLength;
      flushed = conn.socket.write(piece);
    }
    conn.socket.uncork();
    if (!flushed) {
      this.drained = new Promise((resolve) => {
        this.releaseDrain = () => {
          conn.socket.off('drain', this.releaseDrain!);
          this.drained = undefined;
          this.releaseDrain = undefined;
          resolve();
        };
        conn.socket.once('drain', this.releaseDrain);
      });
    }
  }

  /** Sends one encoded chunk; resolves when the receiver has applied it (its ACK), however many copies that took. */
  async sendChunk(chunk: Uint8Array): Promise<SentChunk> {
    if (this.failure) throw this.failure;
    const frameNo = this.frameNo++;
    const pieces = encodeChunkFrame(frameNo, chunk);
    await this.limiter?.take(pieces[0].byteLength + pieces[1].byteLength);
    const { frame, acked } = this.pending.add(frameNo, pieces);
    // a link failing while we wait for its connection rejects this too, and the caller gets that error instead
    acked.catch(() => undefined);
    this.firstSendMs ??= performance.now();
    const conn = await this.connection();
    // unless a resume sent it already (or it was acknowledged): a write cut short by a drop is left
    // to the resume, which sends again what went to the lost connection
    if (frame.sentOn !== conn && this.pending.has(frameNo)) {
      this.pending.markSent(frame, conn);
      await this.writeNow(conn, pieces).catch(() => undefined);
    }
    return acked;
  }

  /** Reconnections since the last call (each is counted once in the statistics). */
  takeReconnects(): number {
    const n = this.reconnects - this.reportedReconnects;
    this.reportedReconnects = this.reconnects;
    return n;
  }

  /** Average over the link's life: bytes acknowledged / time from the first chunk sent to the last ACK. */
  get averageBandwidthBps(): number {
    const last = this.bandwidth.lastAckMs;
    if (this.firstSendMs === undefined || last === undefined || last <= this.firstSendMs) return 0;
    return (this.bandwidth.totalAckedBytes * 8 * 1000) / (last - this.firstSendMs);
  }

  /** The end of a capture round; kept and sent again after a reconnection (the receiver takes it twice harmlessly). */
  async sendCaptured(captured: Captured): Promise<void> {
    if (this.failure) throw this.failure;
    const frame = encodeJsonFrame(FrameType.Captured, captured);
    this.capturedFrames.push(frame);
    await this.write(frame).catch((err: unknown) => {
      if (this.failure) throw this.failure;
      this.options.log?.debug('captured frame write interrupted', { reason: errorMessage(err) });
    });
  }

  private readonly probes = new Map<number, (arrival: ProbeArrival) => void>();
  private probeId = 0;

  /** Sends probe frames back to back; resolves with the receiver's timing of each, or undefined. */
  private async probeFrames(paddingBytes: number[], timeoutMs: number): Promise<ProbeArrival[] | undefined> {
    const ids = paddingBytes.map(() => ++this.probeId);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), timeoutMs)));
    const answers = ids.map((id) => new Promise<ProbeArrival>((resolve) => this.probes.set(id, resolve)));
    try {
      for (const [i, id] of ids.entries()) await this.write(encodeProbeFrame(id, paddingBytes[i]!));
      return await Promise.race([Promise.all(answers), timeout]);
    } catch {
      return undefined;
    } finally {
      clearTimeout(timer);
      for (const id of ids) this.probes.delete(id);
    }
  }

  /**
   * The link's speed before any chunk has crossed it (bits/s), for the tuner's first decision, or
   * undefined when the link did not answer. A lead frame empties a shaper's burst allowance; the
   * frame right behind it is timed by the receiver, delivery by delivery (services/receiver/arrival.ts),
   * because the spacing of the answers at the sender reads packet batching, not the link. Further
   * rounds with a larger frame follow while a frame crosses too fast to time (see link-probe.ts),
   * up to `maxMeasuredBytes`, so the padding stays cheap on a fast link. A round in which this
   * thread waited long for a core read the sender's pace: it is scaled up (see STARVED_SENDER_SHARE).
   */
  async probe(leadBytes = 128 * 1024, timeoutMs = 3000, maxMeasuredBytes = 1024 * 1024): Promise<number | undefined> {
    let bps: number | undefined;
    let measuredBytes: number | undefined = Math.min(64 * 1024, maxMeasuredBytes);
    for (let round = 1; measuredBytes !== undefined; round++) {
      const waitedFromMs = runQueueWaitMs();
      const startedMs = performance.now();
      const answers = await this.probeFrames([leadBytes, measuredBytes], timeoutMs);
      if (!answers) break;
      const waitedToMs = runQueueWaitMs();
      const wallMs = performance.now() - startedMs;
      const senderWaitShare = waitedFromMs !== undefined && waitedToMs !== undefined && wallMs > 0 ? (waitedToMs - waitedFromMs) / wallMs : 0;
      const reading = probeRound(round, measuredBytes, answers[1]!, maxMeasuredBytes, senderWaitShare);
      this.options.log?.debug('link probe round', {
        round,
        leadBytes,
        measuredBytes,
        timedBytes: answers[1]!.bytes,
        spanMs: Number(answers[1]!.spanMs.toFixed(2)),
        senderWaitShare: Number(senderWaitShare.toFixed(2)),
        bandwidthBps: Math.round(reading.bps),
      });
      bps = reading.bps;
      measuredBytes = reading.nextMeasuredBytes;
      leadBytes = 64 * 1024;
    }
    return bps !== undefined && this.options.rateCapBps > 0 ? Math.min(bps, this.options.rateCapBps) : bps;
  }

  private goFrame: Buffer | undefined;
  private resumed: { resolve: (atMs: number) => void; reject: (e: Error) => void; promise: Promise<number> } | undefined;

  /**
   * Live handoffs, once the destination's VM is ready: the source is stopped for good, the
   * destination may run it. Sent again after a reconnection until the destination says it runs.
   */
  commit(): Promise<number> {
    if (!this.resumed) {
      let resolve!: (atMs: number) => void;
      let reject!: (e: Error) => void;
      const promise = new Promise<number>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      this.resumed = { resolve, reject, promise };
      this.goFrame = encodeFrame(FrameType.Go, Buffer.alloc(0));
      void this.write(this.goFrame).catch(() => undefined);
    }
    return this.resumed.promise;
  }

  close(): void {
    this.closed = true;
    clearInterval(this.watchdog);
    this.conn?.socket.end();
  }
}
