/**
 * The WAN link's framing: [magic "HO"][version][type][payload length u32][crc32 u32][payload].
 * Every frame is checksummed; a reader rejects bad magic, oversize frames and checksum mismatches
 * with the cause, before any payload is interpreted.
 */
import { crc32 } from 'node:zlib';
import { MalformedMessageError } from '../model/errors.js';
import { parseRebuildResult, type ImageDigests, type RebuildResult } from '../model/migration.js';
import { amount, count, digests, object, text } from '../model/validate.js';
import type { VmDescription } from '../vm/qemu.js';
import type { SourceMachine } from '../model/migration.js';
import { validateMigrationId } from './chunk-codec.js';
import { MAX_DEVICE_STATE_CHARS, NATS_MAX_PAYLOAD_BYTES } from '../config/limits.js';

export const FrameType = {
  Hello: 1,
  Accept: 2,
  Refuse: 3,
  Chunk: 4,
  Ack: 5,
  Captured: 6,
  Result: 7,
  Error: 8,
  /** receiver -> sender, every second: bytes received on this connection (the link is alive) */
  Progress: 9,
  /** live: sender -> receiver, the source is stopped for good: resume the VM */
  Go: 10,
  /** live: receiver -> sender, the VM runs at the destination (epoch ms) */
  Resumed: 11,
  /** sender -> receiver: [probe id u32][padding], answered at once: the link's speed before chunks flow */
  Probe: 12,
  /** receiver -> sender: [probe id u32] */
  ProbeAck: 13,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];

const MAGIC0 = 0x48; // 'H'
const MAGIC1 = 0x4f; // 'O'
const VERSION = 1;
export const FRAME_HEADER_BYTES = 12;
/** Largest payload accepted: a chunk or a captured event as large as a NATS message, and room. */
export const MAX_FRAME_PAYLOAD = 2 * NATS_MAX_PAYLOAD_BYTES;

export interface Frame {
  type: FrameType;
  payload: Buffer;
}

export function encodeFrame(type: FrameType, payload: Uint8Array): Buffer {
  const header = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  header[0] = MAGIC0;
  header[1] = MAGIC1;
  header[2] = VERSION;
  header[3] = type;
  header.writeUInt32LE(payload.byteLength, 4);
  header.writeUInt32LE(crc32(payload), 8);
  return Buffer.concat([header, payload]);
}

export function encodeJsonFrame(type: FrameType, value: unknown): Buffer {
  return encodeFrame(type, Buffer.from(JSON.stringify(value)));
}

/**
 * CHUNK payload: [frame number u32][encoded chunk]; the receiver ACKs the number. Returned as two
 * pieces (header with number, and the chunk as it is) so a large chunk is not copied to be framed.
 */
export function encodeChunkFrame(frameNo: number, chunk: Uint8Array): [Buffer, Uint8Array] {
  const head = Buffer.allocUnsafe(FRAME_HEADER_BYTES + 4);
  head[0] = MAGIC0;
  head[1] = MAGIC1;
  head[2] = VERSION;
  head[3] = FrameType.Chunk;
  head.writeUInt32LE(chunk.byteLength + 4, 4);
  head.writeUInt32LE(frameNo, FRAME_HEADER_BYTES);
  head.writeUInt32LE(crc32(chunk, crc32(head.subarray(FRAME_HEADER_BYTES))), 8);
  return [head, chunk];
}

export function splitChunkFrame(payload: Buffer): { frameNo: number; chunk: Buffer } {
  if (payload.byteLength < 4) throw new MalformedMessageError('chunk frame: shorter than its frame number');
  return { frameNo: payload.readUInt32LE(0), chunk: payload.subarray(4) };
}

export function encodeAckFrame(frameNo: number): Buffer {
  const no = Buffer.allocUnsafe(4);
  no.writeUInt32LE(frameNo, 0);
  return encodeFrame(FrameType.Ack, no);
}

export function parseJsonPayload(frame: Frame): unknown {
  try {
    return JSON.parse(frame.payload.toString('utf8'));
  } catch {
    throw new MalformedMessageError(`frame type ${frame.type}: payload is not JSON`);
  }
}

const KNOWN_TYPES = new Set<number>(Object.values(FrameType));

/** Incremental frame parser for a byte stream. */
export class FrameReader {
  private pieces: Buffer[] = [];
  private bufferedBytes = 0;
  /** header + payload bytes of the frame being read, once its header is known */
  private needed = FRAME_HEADER_BYTES;
  /** whether `needed` covers a known header's payload (an empty payload makes the sizes equal) */
  private headerKnown = false;
  frames = 0;

  /** Feeds bytes; returns the complete frames they finish. Throws on the first bad frame. */
  push(data: Buffer): Frame[] {
    this.pieces.push(data);
    this.bufferedBytes += data.byteLength;
    const out: Frame[] = [];
    // pieces are joined only when a whole header or frame is there: a 1 MiB frame arriving in
    // 64 KiB reads is copied once, not once per read
    while (this.bufferedBytes >= this.needed) {
      const all = this.pieces.length === 1 ? this.pieces[0]! : Buffer.concat(this.pieces, this.bufferedBytes);
      this.pieces = [all];
      if (!this.headerKnown) {
        this.needed = FRAME_HEADER_BYTES + this.checkHeader(all);
        this.headerKnown = true;
        continue;
      }
      const payload = all.subarray(FRAME_HEADER_BYTES, this.needed);
      if (crc32(payload) !== all.readUInt32LE(8)) throw new MalformedMessageError(`frame ${this.frames}: checksum mismatch (corrupted in transit)`);
      out.push({ type: all[3] as FrameType, payload });
      this.frames++;
      const rest = all.subarray(this.needed);
      this.pieces = rest.byteLength ? [rest] : [];
      this.bufferedBytes = rest.byteLength;
      this.needed = FRAME_HEADER_BYTES;
      this.headerKnown = false;
    }
    return out;
  }

  /** Validates a frame header; returns its payload length. */
  private checkHeader(header: Buffer): number {
    if (header[0] !== MAGIC0 || header[1] !== MAGIC1) throw new MalformedMessageError(`frame ${this.frames}: bad magic (not a handoff peer?)`);
    if (header[2] !== VERSION) throw new MalformedMessageError(`frame ${this.frames}: protocol version ${header[2]}, expected ${VERSION}`);
    if (!KNOWN_TYPES.has(header[3]!)) throw new MalformedMessageError(`frame ${this.frames}: unknown type ${header[3]}`);
    const length = header.readUInt32LE(4);
    if (length > MAX_FRAME_PAYLOAD) throw new MalformedMessageError(`frame ${this.frames}: payload of ${length} bytes exceeds ${MAX_FRAME_PAYLOAD}`);
    return length;
  }

  /** Bytes of an unfinished frame left when the stream ended (a truncated frame if not 0). */
  get pendingBytes(): number {
    return this.bufferedBytes;
  }
}

/** HELLO: who the source is and which base it expects the destination to hold. */
export interface Hello {
  migrationId: string;
  baseHashes: ImageDigests;
  bytes: { memory: number; disk: number };
  /** random per sender link: frame numbers mean something only within one */
  linkId?: string;
  /** the sender link span's W3C traceparent: the destination's spans join the migration's trace */
  traceparent?: string;
  /** which chunks are traced (see shared/telemetry/telemetry.ts) */
  traceEveryChunks?: number;
  /** live, RAM in a shared file: the VM the destination starts (with -incoming) and resumes */
  vm?: VmDescription;
  /** live, RAM from QEMU's stream: the source's own machine; the destination refuses one it cannot run */
  machine?: SourceMachine;
}

/** ERROR: why the receiver closes the link; `resumable` when a new connection may carry on (transit corruption). */
export interface LinkError {
  reason: string;
  resumable: boolean;
}

export function encodeProgressFrame(receivedBytes: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64LE(BigInt(receivedBytes), 0);
  return encodeFrame(FrameType.Progress, b);
}

export function parseProgressFrame(payload: Buffer): number {
  if (payload.byteLength !== 8) throw new MalformedMessageError(`progress frame: ${payload.byteLength} bytes, expected 8`);
  return Number(payload.readBigUInt64LE(0));
}

export interface Captured {
  round: number;
  slices: number;
  imageHashes: ImageDigests;
  /** the last round (absent: true) */
  final?: boolean;
  /** live, final round: the device state, zstd against the base's, base64 */
  deviceState?: string;
}

/** `HOST:PORT` (IPv6 in brackets); port 0 only where `listening` (any free port). */
export function parseAddress(address: string, listening = false): { host: string; port: number } {
  const m = /^(.*):(\d+)$/.exec(address);
  const port = Number(m?.[2]);
  if (!m || !m[1] || !(port >= (listening ? 0 : 1) && port < 65536)) throw new Error(`bad address ${JSON.stringify(address)}: expected HOST:PORT`);
  return { host: m[1].replace(/^\[|\]$/g, ''), port };
}


// Validated readers of the JSON frames: a peer's frame is checked field by field before use.

const TRACEPARENT = /^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/;
function traceparent(v: unknown): string {
  if (typeof v !== 'string' || !TRACEPARENT.test(v)) throw new MalformedMessageError('hello frame: traceparent is not a W3C traceparent');
  return v;
}

function vmDescription(v: unknown): VmDescription {
  const o = object(v, 'hello frame: vm');
  return {
    memoryBytes: count(o.memoryBytes, 'hello frame: vm memoryBytes', 2 ** 40),
    cpus: count(o.cpus, 'hello frame: vm cpus', 1024),
    append: text(o.append, 'hello frame: vm append', 4096),
  };
}

/** most arguments and RAM blocks a source machine may have */
const MAX_MACHINE_ARGS = 4096;
const MAX_RAM_BLOCKS = 256;

function sourceMachine(v: unknown): SourceMachine {
  const o = object(v, 'hello frame: machine');
  if (!Array.isArray(o.argv) || o.argv.length === 0 || o.argv.length > MAX_MACHINE_ARGS) throw new MalformedMessageError(`hello frame: machine argv is not a command line (1 to ${MAX_MACHINE_ARGS} arguments)`);
  if (!Array.isArray(o.ramBlocks) || o.ramBlocks.length === 0 || o.ramBlocks.length > MAX_RAM_BLOCKS) throw new MalformedMessageError(`hello frame: machine ramBlocks is not a list of 1 to ${MAX_RAM_BLOCKS} blocks`);
  return {
    argv: o.argv.map((a, i) => text(a, `hello frame: machine argv[${i}]`, 65536)),
    ramBlocks: o.ramBlocks.map((b, i) => {
      const block = object(b, `hello frame: machine ramBlocks[${i}]`);
      return {
        idstr: text(block.idstr, `hello frame: machine ramBlocks[${i}] idstr`, 256),
        bytes: count(block.bytes, `hello frame: machine ramBlocks[${i}] bytes`, 2 ** 44),
        offset: count(block.offset, `hello frame: machine ramBlocks[${i}] offset`, 2 ** 44),
      };
    }),
  };
}

function frameObject(frame: Frame, what: string): Record<string, unknown> {
  return object(parseJsonPayload(frame), `${what} frame`);
}

export function parseHello(frame: Frame): Hello {
  const o = frameObject(frame, 'hello');
  const bytes = o.bytes as Record<string, unknown> | null;
  if (typeof bytes !== 'object' || bytes === null) throw new MalformedMessageError('hello frame: image sizes missing');
  if (o.linkId !== undefined && (typeof o.linkId !== 'string' || !/^[0-9a-f]{8,64}$/.test(o.linkId))) throw new MalformedMessageError('hello frame: linkId is not hex');
  return {
    migrationId: validateMigrationId(o.migrationId),
    baseHashes: digests(o.baseHashes, 'hello frame'),
    bytes: { memory: count(bytes.memory, 'hello frame: memory size'), disk: count(bytes.disk, 'hello frame: disk size') },
    ...(o.linkId ? { linkId: o.linkId as string } : {}),
    ...(o.traceparent !== undefined ? { traceparent: traceparent(o.traceparent) } : {}),
    ...(o.traceEveryChunks !== undefined ? { traceEveryChunks: count(o.traceEveryChunks, 'hello frame: traceEveryChunks', 2 ** 32) } : {}),
    ...(o.vm !== undefined ? { vm: vmDescription(o.vm) } : {}),
    ...(o.machine !== undefined ? { machine: sourceMachine(o.machine) } : {}),
  };
}

export function parseCaptured(frame: Frame): Captured {
  const o = frameObject(frame, 'captured');
  return {
    round: count(o.round, 'captured frame: round', 65534),
    slices: count(o.slices, 'captured frame: slices', 2 ** 32),
    imageHashes: digests(o.imageHashes, 'captured frame'),
    ...(o.final !== undefined ? { final: o.final === true } : {}),
    ...(o.deviceState !== undefined ? { deviceState: text(o.deviceState, 'captured frame: deviceState', MAX_DEVICE_STATE_CHARS) } : {}),
  };
}

/** ACCEPT: the destination's base, and on a resumed link the frames it applied whose ACK may have been lost. */
export interface Accept {
  baseHashes: ImageDigests;
  appliedFrames?: number[];
}

/** Most frame numbers an ACCEPT lists (the newest): a window's worth. */
export const MAX_APPLIED_FRAMES = 4096;

export function parseAccept(frame: Frame): Accept {
  const o = frameObject(frame, 'accept');
  const applied = o.appliedFrames;
  if (applied !== undefined && (!Array.isArray(applied) || applied.length > MAX_APPLIED_FRAMES)) throw new MalformedMessageError('accept frame: appliedFrames is not a list of frame numbers');
  return {
    baseHashes: digests(o.baseHashes, 'accept frame'),
    ...(applied ? { appliedFrames: applied.map((n) => count(n, 'accept frame: applied frame', 2 ** 32 - 1)) } : {}),
  };
}

export function parseReason(frame: Frame, what: string): string {
  return text(frameObject(frame, what).reason, `${what} frame: reason`);
}

export function parseLinkError(frame: Frame): LinkError {
  const o = frameObject(frame, 'error');
  return { reason: text(o.reason, 'error frame: reason'), resumable: o.resumable === true };
}

export function parseResult(frame: Frame): RebuildResult {
  return parseRebuildResult(parseJsonPayload(frame), 'result frame');
}

export function encodeResumedFrame(resumedAtMs: number): Buffer {
  return encodeJsonFrame(FrameType.Resumed, { resumedAtMs });
}

export function parseResumed(frame: Frame): number {
  return amount(frameObject(frame, 'resumed').resumedAtMs, 'resumed frame: resumedAtMs');
}

/** Padding is zeros: neither TLS nor the link compresses it. */
export function encodeProbeFrame(id: number, paddingBytes: number): Buffer {
  const b = Buffer.alloc(4 + paddingBytes);
  b.writeUInt32LE(id, 0);
  return encodeFrame(FrameType.Probe, b);
}

export function probeIdOf(frame: Frame): number {
  if (frame.payload.byteLength < 4) throw new MalformedMessageError(`probe frame: ${frame.payload.byteLength} bytes`);
  return frame.payload.readUInt32LE(0);
}

/**
 * The receiver's timing of a probe frame: bytes that arrived after the delivery that finished the
 * previous probe frame, and the time between that delivery and the one finishing this frame (both
 * 0 when they came together). See services/receiver/arrival.ts.
 */
export interface ProbeArrival {
  bytes: number;
  spanMs: number;
}

const PROBE_ACK_BYTES = 4 + 8 + 8;

export function encodeProbeAckFrame(id: number, arrival: ProbeArrival): Buffer {
  const b = Buffer.alloc(PROBE_ACK_BYTES);
  b.writeUInt32LE(id, 0);
  b.writeDoubleLE(arrival.bytes, 4);
  b.writeDoubleLE(arrival.spanMs, 12);
  return encodeFrame(FrameType.ProbeAck, b);
}

export function parseProbeAck(frame: Frame): { id: number } & ProbeArrival {
  if (frame.payload.byteLength !== PROBE_ACK_BYTES) throw new MalformedMessageError(`probe ack frame: ${frame.payload.byteLength} bytes, expected ${PROBE_ACK_BYTES}`);
  const bytes = frame.payload.readDoubleLE(4);
  const spanMs = frame.payload.readDoubleLE(12);
  if (!(Number.isFinite(bytes) && bytes >= 0 && Number.isFinite(spanMs) && spanMs >= 0)) throw new MalformedMessageError(`probe ack frame: bad timing (${bytes} bytes in ${spanMs} ms)`);
  return { id: frame.payload.readUInt32LE(0), bytes, spanMs };
}
