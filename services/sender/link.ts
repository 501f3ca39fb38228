/** The source end of the WAN link: handshake, paced chunk frames acknowledged by the receiver, result. */
import { connect, type Socket } from 'node:net';
import { BaseMismatchError, MalformedMessageError } from '../../shared/errors.js';
import type { ImageDigests, RebuildResult } from '../../shared/migration.js';
import { FrameReader, FrameType, encodeChunkFrame, encodeJsonFrame, parseAddress, parseJsonPayload, splitChunkFrame, type Captured, type Frame, type Hello } from '../../shared/wire.js';
import { BandwidthEstimator } from './bandwidth.js';
import { RateLimiter } from './rate.js';

export class WanLink {
  readonly bandwidth = new BandwidthEstimator();
  wireBytes = 0;
  private firstSendMs: number | undefined;
  private frameNo = 0;
  private readonly waiting = new Map<number, { bytes: number; resolve: () => void; reject: (e: Error) => void }>();
  private readonly limiter: RateLimiter | undefined;
  private failure: Error | undefined;
  private resultHandlers: { resolve: (r: RebuildResult) => void; reject: (e: Error) => void } | undefined;
  readonly result: Promise<RebuildResult>;

  private constructor(
    private readonly socket: Socket,
    readonly migrationId: string,
    rateCapBps: number,
  ) {
    this.limiter = rateCapBps > 0 ? new RateLimiter(rateCapBps) : undefined;
    this.result = new Promise((resolve, reject) => {
      this.resultHandlers = { resolve, reject };
    });
    this.result.catch(() => undefined);
  }

  /** Connects and shakes hands; rejects with BaseMismatchError when the destination refuses. */
  static async open(address: string, hello: Hello, rateCapBps: number, timeoutMs = 15_000): Promise<{ link: WanLink; destinationBaseHashes: ImageDigests }> {
    const { host, port } = parseAddress(address);
    const socket = connect({ host, port, noDelay: true });
    const link = new WanLink(socket, hello.migrationId, rateCapBps);
    const reader = new FrameReader();
    let accept: ((v: ImageDigests) => void) | undefined;
    let refuse: ((e: Error) => void) | undefined;
    const accepted = new Promise<ImageDigests>((resolve, reject) => {
      accept = resolve;
      refuse = reject;
    });
    const timer = setTimeout(() => refuse?.(new Error(`destination ${address} did not answer the handshake within ${timeoutMs / 1000} s`)), timeoutMs);
    socket.on('data', (data: Buffer) => {
      let frames: Frame[];
      try {
        frames = reader.push(data);
      } catch (err) {
        link.fail(err as Error);
        refuse?.(err as Error);
        return;
      }
      for (const frame of frames) {
        if (frame.type === FrameType.Accept) accept?.((parseJsonPayload(frame) as { baseHashes: ImageDigests }).baseHashes);
        else if (frame.type === FrameType.Refuse) refuse?.(new BaseMismatchError(String((parseJsonPayload(frame) as { reason: string }).reason)));
        else link.onFrame(frame);
      }
    });
    socket.on('error', (err) => {
      const e = new Error(`WAN link to ${address}: ${err.message}`);
      refuse?.(e);
      link.fail(e);
    });
    socket.on('close', () => link.fail(new Error(`WAN link to ${address} closed by the destination`)));
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    }).catch((err: Error) => {
      clearTimeout(timer);
      throw new Error(`cannot reach destination ${address}: ${err.message}`);
    });
    link.write(encodeJsonFrame(FrameType.Hello, hello));
    try {
      const destinationBaseHashes = await accepted;
      return { link, destinationBaseHashes };
    } catch (err) {
      socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  private onFrame(frame: Frame): void {
    switch (frame.type) {
      case FrameType.Ack: {
        const { frameNo } = splitChunkFrame(frame.payload);
        const w = this.waiting.get(frameNo);
        if (!w) return; // an ACK for a frame resent or unknown: harmless
        this.waiting.delete(frameNo);
        this.bandwidth.ack(w.bytes);
        w.resolve();
        return;
      }
      case FrameType.Result:
        this.resultHandlers?.resolve(parseJsonPayload(frame) as RebuildResult);
        return;
      case FrameType.Error:
        this.fail(new Error(`destination: ${String((parseJsonPayload(frame) as { reason: string }).reason)}`));
        return;
      default:
        this.fail(new MalformedMessageError(`unexpected frame type ${frame.type} from the destination`));
    }
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    for (const w of this.waiting.values()) w.reject(err);
    this.waiting.clear();
    this.resultHandlers?.reject(err);
    this.socket.destroy();
    this.releaseDrain?.(); // a destroyed socket never drains: let waiting writers see the failure
  }

  get failed(): Error | undefined {
    return this.failure;
  }

  /** set while the socket's buffer is full: writers wait for one shared 'drain' */
  private drained: Promise<void> | undefined;
  private releaseDrain: (() => void) | undefined;

  private async write(frame: Buffer | readonly Uint8Array[]): Promise<void> {
    while (this.drained) await this.drained;
    const pieces = Buffer.isBuffer(frame) ? [frame] : frame;
    this.socket.cork();
    let flushed = true;
    for (const piece of pieces) {
      this.wireBytes += piece.byteLength;
      flushed = this.socket.write(piece);
    }
    this.socket.uncork();
    if (!flushed) {
      this.drained = new Promise((resolve) => {
        this.releaseDrain = () => {
          this.drained = undefined;
          this.releaseDrain = undefined;
          resolve();
        };
        this.socket.once('drain', this.releaseDrain);
      });
    }
  }

  /** Sends one encoded chunk; resolves with the frame's size on the wire when the receiver has it durably (its ACK). */
  async sendChunk(chunk: Uint8Array): Promise<number> {
    if (this.failure) throw this.failure;
    const frameNo = this.frameNo++;
    const frame = encodeChunkFrame(frameNo, chunk);
    const frameBytes = frame[0].byteLength + frame[1].byteLength;
    await this.limiter?.take(frameBytes);
    const acked = new Promise<void>((resolve, reject) => this.waiting.set(frameNo, { bytes: frameBytes, resolve, reject }));
    this.firstSendMs ??= performance.now();
    await this.write(frame);
    await acked;
    return frameBytes;
  }

  /** Average over the link's life: bytes acknowledged / time from the first chunk sent to the last ACK. */
  get averageBandwidthBps(): number {
    const last = this.bandwidth.lastAckMs;
    if (this.firstSendMs === undefined || last === undefined || last <= this.firstSendMs) return 0;
    return (this.bandwidth.totalAckedBytes * 8 * 1000) / (last - this.firstSendMs);
  }

  async sendCaptured(captured: Captured): Promise<void> {
    if (this.failure) throw this.failure;
    await this.write(encodeJsonFrame(FrameType.Captured, captured));
  }

  close(): void {
    this.socket.end();
  }
}
