/**
 * Chunk <-> bytes, for the bus and the WAN alike. MessagePack header fields with the columns and
 * the body as raw binary; decoding validates everything a later stage relies on, so a malformed
 * message fails here with its cause and never reaches an image.
 */
import { endianness } from 'node:os';
import { Packr } from 'msgpackr';
import { PAGE_KIND_COUNT, PageKind, type Chunk } from '../model/chunk.js';
import { MalformedMessageError } from '../model/errors.js';
import { isMode } from '../model/mode.js';
import { CHECK_BYTES, PAGE_SIZE, STRONG_HASH_BYTES } from '../image/pages.js';

// Typed-array columns are shipped as their bytes; every supported host (x86-64, arm64) is little-endian.
if (endianness() !== 'LE') throw new Error('cloudlet-handoff needs a little-endian host');

const CHUNK_VERSION = 1;
/** Upper bound on pages per chunk; NATS max_payload keeps real chunks far below. */
export const MAX_PAGES_PER_CHUNK = 16384;
export const MAX_MIGRATION_ID_LENGTH = 64;
const MIGRATION_ID_PATTERN = /^[A-Za-z0-9_-]+$/;

const packr = new Packr({ useRecords: false, moreTypes: false });

interface ChunkRecord {
  v: number;
  mig: string;
  round: number;
  seq: number;
  part: number;
  parts: number;
  image: number;
  mode: unknown;
  idx: Uint8Array;
  kind: Uint8Array;
  refImg: Uint8Array;
  refIdx: Uint8Array;
  len: Uint8Array;
  chk: Uint8Array;
  hash?: Uint8Array;
  rawLen: number;
  body: Uint8Array;
}

function bytesOf(view: ArrayBufferView): Uint8Array {
  return new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
}

export function encodeChunk(chunk: Chunk): Uint8Array {
  const record: ChunkRecord = {
    v: CHUNK_VERSION,
    mig: chunk.migrationId,
    round: chunk.round,
    seq: chunk.seq,
    part: chunk.part,
    parts: chunk.parts,
    image: chunk.image,
    mode: chunk.mode,
    idx: bytesOf(chunk.pageIndex),
    kind: chunk.kind,
    refImg: chunk.refImage,
    refIdx: bytesOf(chunk.refIndex),
    len: bytesOf(chunk.bodyLength),
    chk: chunk.check,
    rawLen: chunk.bodyRawLength,
    body: chunk.body,
  };
  if (chunk.strongHash) record.hash = chunk.strongHash;
  return packr.pack(record);
}

function fail(why: string): never {
  throw new MalformedMessageError(`malformed chunk: ${why}`);
}

function isUint(value: unknown, max: number): value is number {
  return typeof value === 'number' && Number.isInteger(value) && value >= 0 && value <= max;
}

function binary(record: Record<string, unknown>, field: string, byteLength: number): Uint8Array {
  const value = record[field];
  if (!(value instanceof Uint8Array)) fail(`field ${field} is not binary`);
  if (value.byteLength !== byteLength) fail(`field ${field} has ${value.byteLength} bytes, expected ${byteLength}`);
  return value;
}

/** Copies into an aligned Uint32Array: msgpack views may start at any byte. */
function uint32Column(bytes: Uint8Array): Uint32Array {
  const out = new Uint32Array(bytes.byteLength / 4);
  new Uint8Array(out.buffer).set(bytes);
  return out;
}

export function validateMigrationId(id: unknown): string {
  if (typeof id !== 'string' || id.length === 0 || id.length > MAX_MIGRATION_ID_LENGTH || !MIGRATION_ID_PATTERN.test(id)) {
    fail(`migration id ${JSON.stringify(id)} is not 1..${MAX_MIGRATION_ID_LENGTH} of [A-Za-z0-9_-]`);
  }
  return id;
}

export function decodeChunk(bytes: Uint8Array): Chunk {
  let decoded: unknown;
  try {
    decoded = packr.unpack(bytes);
  } catch (err) {
    fail(`not MessagePack (${err instanceof Error ? err.message : String(err)})`);
  }
  if (typeof decoded !== 'object' || decoded === null || Array.isArray(decoded)) fail('not a map');
  const r = decoded as Record<string, unknown>;
  if (r.v !== CHUNK_VERSION) fail(`version ${String(r.v)}, expected ${CHUNK_VERSION}`);
  const migrationId = validateMigrationId(r.mig);
  if (!isUint(r.round, 0xffff)) fail('round out of range');
  if (!isUint(r.seq, 0xffffffff)) fail('seq out of range');
  if (!isUint(r.parts, 256) || r.parts === 0) fail('parts out of range');
  if (!isUint(r.part, r.parts - 1)) fail('part out of range');
  if (r.image !== 0 && r.image !== 1) fail('image is not 0 (memory) or 1 (disk)');
  if (!isMode(r.mode)) fail('mode is not a valid mode');
  const kind = r.kind;
  if (!(kind instanceof Uint8Array)) fail('field kind is not binary');
  const n = kind.byteLength;
  if (n > MAX_PAGES_PER_CHUNK) fail(`${n} pages, more than ${MAX_PAGES_PER_CHUNK}`);
  const pageIndex = uint32Column(binary(r, 'idx', n * 4));
  const refImage = binary(r, 'refImg', n);
  const refIndex = uint32Column(binary(r, 'refIdx', n * 4));
  const bodyLength = uint32Column(binary(r, 'len', n * 4));
  const check = binary(r, 'chk', n * CHECK_BYTES);
  const strongHash = r.hash === undefined ? undefined : binary(r, 'hash', n * STRONG_HASH_BYTES);
  const patched = r.mode.delta === 'patch';
  let total = 0;
  for (let i = 0; i < n; i++) {
    const k = kind[i]!;
    const len = bodyLength[i]!;
    if (k >= PAGE_KIND_COUNT) fail(`page ${i} has unknown kind ${k}`);
    if (k === PageKind.Raw && len !== PAGE_SIZE) fail(`raw page ${i} has body ${len}, expected ${PAGE_SIZE}`);
    if ((k === PageKind.Zero || k === PageKind.Base || k === PageKind.Sent) && len !== 0) fail(`reference page ${i} has a body`);
    if ((k === PageKind.Xor || k === PageKind.ZstdDelta) && (len === 0 || len >= PAGE_SIZE)) fail(`delta page ${i} has body ${len}`);
    if (patched && (k === PageKind.Xor || k === PageKind.ZstdDelta)) fail(`page ${i} of a patch chunk is delta-encoded on its own`);
    if ((k === PageKind.Base || k === PageKind.Sent) && refImage[i]! > 1) fail(`page ${i} refers to image ${refImage[i]}`);
    total += len;
  }
  if (r.rawLen !== total) fail(`body lengths add up to ${total}, header says ${String(r.rawLen)}`);
  const body = r.body;
  if (!(body instanceof Uint8Array)) fail('body is not binary');
  if (r.mode.compressor === 'none' && body.byteLength !== total) fail(`uncompressed body has ${body.byteLength} bytes, expected ${total}`);
  if (body.byteLength > n * PAGE_SIZE + 65536) fail(`body of ${body.byteLength} bytes is larger than ${n} pages can need`);
  const chunk: Chunk = {
    migrationId,
    round: r.round,
    seq: r.seq,
    part: r.part,
    parts: r.parts,
    image: r.image,
    mode: r.mode,
    pageIndex,
    kind,
    refImage,
    refIndex,
    bodyLength,
    check,
    body,
    bodyRawLength: total,
  };
  if (strongHash) chunk.strongHash = strongHash;
  return chunk;
}
