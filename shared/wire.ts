/**
 * The WAN link's framing: [magic "HO"][version][type][payload length u32][crc32 u32][payload].
 * Every frame is checksummed; a reader rejects bad magic, oversize frames and checksum mismatches
 * with the cause, before any payload is interpreted.
 */
import { crc32 } from 'node:zlib';
import { MalformedMessageError } from './errors.js';
import type { ImageDigests } from './migration.js';

export const FrameType = {
  Hello: 1,
  Accept: 2,
  Refuse: 3,
  Chunk: 4,
  Ack: 5,
  Captured: 6,
  Result: 7,
  Error: 8,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];

const MAGIC0 = 0x48; // 'H'
const MAGIC1 = 0x4f; // 'O'
const VERSION = 1;
export const FRAME_HEADER_BYTES = 12;
/** Largest payload accepted: a chunk of the largest NATS message plus room. */
export const MAX_FRAME_PAYLOAD = 16 * 1024 * 1024;

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

/** CHUNK payload: [frame number u32][encoded chunk]; the receiver ACKs the number. */
export function encodeChunkFrame(frameNo: number, chunk: Uint8Array): Buffer {
  const no = Buffer.allocUnsafe(4);
  no.writeUInt32LE(frameNo, 0);
  return encodeFrame(FrameType.Chunk, Buffer.concat([no, chunk]));
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
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  frames = 0;

  /** Feeds bytes; returns the complete frames they finish. Throws on the first bad frame. */
  push(data: Buffer): Frame[] {
    this.buffered.push(data);
    this.bufferedBytes += data.byteLength;
    const out: Frame[] = [];
    for (;;) {
      if (this.bufferedBytes < FRAME_HEADER_BYTES) break;
      const all = this.buffered.length === 1 ? this.buffered[0]! : Buffer.concat(this.buffered);
      this.buffered = [all];
      if (all[0] !== MAGIC0 || all[1] !== MAGIC1) throw new MalformedMessageError(`frame ${this.frames}: bad magic (not a handoff peer?)`);
      if (all[2] !== VERSION) throw new MalformedMessageError(`frame ${this.frames}: protocol version ${all[2]}, expected ${VERSION}`);
      const type = all[3]!;
      if (!KNOWN_TYPES.has(type)) throw new MalformedMessageError(`frame ${this.frames}: unknown type ${type}`);
      const length = all.readUInt32LE(4);
      if (length > MAX_FRAME_PAYLOAD) throw new MalformedMessageError(`frame ${this.frames}: payload of ${length} bytes exceeds ${MAX_FRAME_PAYLOAD}`);
      if (all.byteLength < FRAME_HEADER_BYTES + length) break;
      const payload = all.subarray(FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + length);
      const expected = all.readUInt32LE(8);
      if (crc32(payload) !== expected) throw new MalformedMessageError(`frame ${this.frames}: checksum mismatch (corrupted in transit)`);
      out.push({ type: type as FrameType, payload: Buffer.from(payload) });
      this.frames++;
      const rest = all.subarray(FRAME_HEADER_BYTES + length);
      this.buffered = rest.byteLength ? [rest] : [];
      this.bufferedBytes = rest.byteLength;
    }
    return out;
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
}

export interface Captured {
  round: number;
  slices: number;
  imageHashes: ImageDigests;
}

/** `HOST:PORT` (IPv6 in brackets); port 0 only where `listening` (any free port). */
export function parseAddress(address: string, listening = false): { host: string; port: number } {
  const m = /^(.*):(\d+)$/.exec(address);
  const port = Number(m?.[2]);
  if (!m || !m[1] || !(port >= (listening ? 0 : 1) && port < 65536)) throw new Error(`bad address ${JSON.stringify(address)}: expected HOST:PORT`);
  return { host: m[1].replace(/^\[|\]$/g, ''), port };
}

