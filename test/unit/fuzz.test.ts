/**
 * Fuzz of every decoder that reads the network or the bus: thousands of mutated inputs each.
 * Each input must decode or be refused as malformed (no other error), quickly (no hang), and the
 * heap must not grow with what an input claims (no unbounded allocation).
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { encodeChunk, decodeChunk } from '../../shared/wire/chunk-codec.js';
import { PageKind, type Chunk } from '../../shared/model/chunk.js';
import { MalformedMessageError } from '../../shared/model/errors.js';
import { encodeLinkReport, parseLinkReport, type LinkReport } from '../../shared/model/link-report.js';
import { encodeEvent, isDescriptor, parseEvent, parseStats, type MigrationEvent, type StageStats } from '../../shared/model/migration.js';
import { isMode } from '../../shared/model/mode.js';
import {
  FRAME_HEADER_BYTES,
  FrameReader,
  FrameType,
  MAX_FRAME_PAYLOAD,
  encodeAckFrame,
  encodeChunkFrame,
  encodeJsonFrame,
  encodeProgressFrame,
  parseAccept,
  parseCaptured,
  parseHello,
  parseLinkError,
  parseProgressFrame,
  parseReason,
  parseResult,
  splitChunkFrame,
  type Frame,
} from '../../shared/wire/frames.js';

const INPUTS = 3000;
const HASH = 'ab'.repeat(32);

/** Deterministic PRNG (mulberry32): a failing input can be found again. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Byte-level mutations: flips, extreme bytes, truncation, splices, random insertions. */
function mutateBytes(seed: Uint8Array, r: () => number): Buffer {
  let b = Buffer.from(seed);
  const ops = 1 + Math.floor(r() * 4);
  for (let i = 0; i < ops; i++) {
    const at = Math.floor(r() * Math.max(1, b.length));
    switch (Math.floor(r() * 6)) {
      case 0:
        if (b.length) b[at] = b[at]! ^ (1 << Math.floor(r() * 8));
        break;
      case 1:
        if (b.length) b[at] = [0x00, 0xff, 0x7f, 0x80, 0xdd, 0xc6, 0xdf][Math.floor(r() * 7)]!;
        break;
      case 2:
        b = b.subarray(0, at);
        break;
      case 3:
        b = Buffer.concat([b.subarray(0, at), b.subarray(Math.floor(r() * b.length))]);
        break;
      case 4:
        b = Buffer.concat([b.subarray(0, at), Buffer.from(Array.from({ length: 1 + Math.floor(r() * 16) }, () => Math.floor(r() * 256))), b.subarray(at)]);
        break;
      default:
        // a 32-bit length field claiming 4 GiB
        if (b.length >= 5) b.writeUInt32BE(0xffffffff, Math.min(at, b.length - 4));
    }
  }
  return b;
}

const ODD_VALUES: unknown[] = [null, -1, 1.5, 2 ** 53, 1e308, '', 'x'.repeat(10_000), '../../etc', [], [1, 2], {}, { a: 1 }, true, '\u0000', 'NaN'];

/** JSON-level mutations: a field dropped, given an odd value, or an odd field added. */
function mutateJson(value: unknown, r: () => number): unknown {
  const clone: unknown = JSON.parse(JSON.stringify(value));
  const objects: Record<string, unknown>[] = [];
  const walk = (v: unknown): void => {
    if (typeof v === 'object' && v !== null) {
      objects.push(v as Record<string, unknown>);
      for (const x of Object.values(v)) walk(x);
    }
  };
  walk(clone);
  const target = objects[Math.floor(r() * objects.length)]!;
  const keys = Object.keys(target);
  const key = keys[Math.floor(r() * keys.length)] ?? 'extra';
  switch (Math.floor(r() * 3)) {
    case 0:
      delete target[key];
      break;
    case 1:
      target[key] = ODD_VALUES[Math.floor(r() * ODD_VALUES.length)];
      break;
    default:
      target[`k${Math.floor(r() * 1000)}`] = ODD_VALUES[Math.floor(r() * ODD_VALUES.length)];
  }
  return clone;
}

interface FuzzReport {
  accepted: number;
  refused: number;
  slowestMs: number;
}

/** Runs `decode` on every input: only MalformedMessageError may come out, each within `maxMs`. */
function fuzz(name: string, inputs: Iterable<Uint8Array | string>, decode: (input: Uint8Array | string) => unknown, maxMs = 200): FuzzReport {
  const report: FuzzReport = { accepted: 0, refused: 0, slowestMs: 0 };
  const heapBefore = process.memoryUsage().heapUsed;
  let i = 0;
  for (const input of inputs) {
    const started = performance.now();
    try {
      decode(input);
      report.accepted++;
    } catch (err) {
      assert.ok(err instanceof MalformedMessageError, `${name} input ${i}: ${(err as Error).name}: ${(err as Error).message}`);
      report.refused++;
    }
    const ms = performance.now() - started;
    report.slowestMs = Math.max(report.slowestMs, ms);
    assert.ok(ms < maxMs, `${name} input ${i} took ${ms.toFixed(0)} ms`);
    i++;
  }
  // inputs are small: a decoder that allocated what a length field claims would show here
  const grownMiB = (process.memoryUsage().heapUsed - heapBefore) / 2 ** 20;
  assert.ok(grownMiB < 256, `${name}: heap grew ${grownMiB.toFixed(0)} MiB`);
  return report;
}

function* byteMutations(seeds: Uint8Array[], seed: number, n = INPUTS): Generator<Buffer> {
  const r = rng(seed);
  for (let i = 0; i < n; i++) yield mutateBytes(seeds[i % seeds.length]!, r);
}

function* jsonMutations(seeds: unknown[], seed: number, n = INPUTS): Generator<string> {
  const r = rng(seed);
  for (let i = 0; i < n; i++) {
    const base = seeds[i % seeds.length];
    const v = mutateJson(base, r);
    const text = JSON.stringify(v);
    // now and then the text itself is damaged too
    yield i % 4 === 0 ? mutateBytes(Buffer.from(text), r).toString('utf8') : text;
  }
}

function sampleChunk(): Chunk {
  const pages = 3;
  return {
    migrationId: 'fuzz-1',
    round: 0,
    seq: 4,
    part: 0,
    parts: 1,
    image: 1,
    mode: { delta: 'xor', compressor: 'zstd', level: 3 },
    pageIndex: Uint32Array.of(1, 2, 9),
    kind: Uint8Array.of(PageKind.Raw, PageKind.Zero, PageKind.Base),
    refImage: Uint8Array.of(0, 0, 1),
    refIndex: Uint32Array.of(0, 0, 5),
    bodyLength: Uint32Array.of(100, 0, 0),
    check: new Uint8Array(8 * pages).fill(7),
    body: new Uint8Array(100).fill(3),
    bodyRawLength: 100,
  };
}

const frameOf = (bytes: Uint8Array | string, type: FrameType): Frame => ({ type, payload: Buffer.from(bytes) });

describe('fuzz: decoders of the network and the bus', { timeout: 300_000 }, () => {
  test('chunks (bus messages and link frames)', () => {
    const seeds = [encodeChunk(sampleChunk()), encodeChunk({ ...sampleChunk(), pageIndex: Uint32Array.of(), kind: new Uint8Array(), refImage: new Uint8Array(), refIndex: new Uint32Array(), bodyLength: new Uint32Array(), check: new Uint8Array(), body: new Uint8Array(), bodyRawLength: 0 })];
    const r = fuzz('decodeChunk', byteMutations(seeds, 1), (b) => decodeChunk(b as Uint8Array));
    assert.ok(r.refused > INPUTS / 3, `only ${r.refused} refused`);
  });

  test('chunks claiming huge arrays or binaries are refused without allocating them', () => {
    const claims = [
      Buffer.from([0xdd, 0xff, 0xff, 0xff, 0xff]), // array32 of 4G elements
      Buffer.from([0xc6, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]), // bin32 of 4 GiB
      Buffer.from([0xdf, 0xff, 0xff, 0xff, 0xff]), // map32 of 4G entries
      Buffer.from([0xdb, 0xff, 0xff, 0xff, 0xff, 0x61]), // str32 of 4 GiB
      Buffer.concat([Buffer.from([0x81, 0xa4]), Buffer.from('body'), Buffer.from([0xc6, 0x7f, 0xff, 0xff, 0xff])]),
    ];
    const r = fuzz('decodeChunk (claims)', claims, (b) => decodeChunk(b as Uint8Array), 50);
    assert.equal(r.refused, claims.length);
  });

  test('the frame reader, fed valid and damaged streams in random pieces', () => {
    const valid = Buffer.concat([
      encodeJsonFrame(FrameType.Hello, { migrationId: 'fuzz-1', baseHashes: { memory: HASH, disk: HASH }, bytes: { memory: 4096, disk: 4096 } }),
      ...encodeChunkFrame(0, encodeChunk(sampleChunk())),
      encodeAckFrame(3),
      encodeProgressFrame(12345),
    ]);
    const r = rng(3);
    const report = fuzz('FrameReader', byteMutations([valid], 2), (b) => {
      const reader = new FrameReader();
      const bytes = b as Buffer;
      let frames: Frame[] = [];
      for (let at = 0; at < bytes.length; ) {
        const n = 1 + Math.floor(r() * 300);
        frames = frames.concat(reader.push(bytes.subarray(at, at + n)));
        at += n;
      }
      // what it holds back is bounded by one frame, whatever a header claims
      assert.ok(reader.pendingBytes <= FRAME_HEADER_BYTES + MAX_FRAME_PAYLOAD);
      for (const f of frames) {
        if (f.type === FrameType.Chunk) decodeChunk(splitChunkFrame(f.payload).chunk);
        if (f.type === FrameType.Hello) parseHello(f);
        if (f.type === FrameType.Progress) parseProgressFrame(f.payload);
        if (f.type === FrameType.Ack) splitChunkFrame(f.payload);
      }
      return frames;
    });
    assert.ok(report.refused > 0 && report.accepted > 0);
  });

  test('handshake, accept, captured, result, refuse and error frames', () => {
    const hello = { migrationId: 'fuzz-1', baseHashes: { memory: HASH, disk: HASH }, bytes: { memory: 4096, disk: 8192 }, linkId: '0123456789abcdef' };
    const result = { verified: true, rebuiltHashes: { memory: HASH, disk: HASH }, pagesWritten: 3, slices: 2, duplicateSlices: 0, rebuildSeconds: 1.5 };
    const cases: [string, unknown, FrameType, (f: Frame) => unknown][] = [
      ['hello', hello, FrameType.Hello, parseHello],
      ['accept', { baseHashes: { memory: HASH, disk: HASH }, appliedFrames: [1, 2, 3] }, FrameType.Accept, parseAccept],
      ['captured', { round: 0, slices: 12, imageHashes: { memory: HASH, disk: HASH } }, FrameType.Captured, parseCaptured],
      ['result', result, FrameType.Result, parseResult],
      ['refuse', { reason: 'base differs' }, FrameType.Refuse, (f) => parseReason(f, 'refuse')],
      ['error', { reason: 'checksum', resumable: true }, FrameType.Error, parseLinkError],
    ];
    for (const [i, [name, value, type, parse]] of cases.entries()) {
      assert.doesNotThrow(() => parse(frameOf(JSON.stringify(value), type)), `${name}: the valid seed is refused`);
      const r = fuzz(`${name} frame`, jsonMutations([value], 10 + i), (text) => parse(frameOf(text, type)));
      assert.ok(r.refused > INPUTS / 4, `${name}: only ${r.refused} refused`);
    }
  });

  test('a deeply nested JSON payload is refused, not a stack overflow', () => {
    const deep = '['.repeat(200_000) + ']'.repeat(200_000);
    fuzz('deep JSON', [deep], (t) => parseHello(frameOf(t, FrameType.Hello)), 2000);
  });

  test('events on the bus', () => {
    const seeds: MigrationEvent[] = [
      { type: 'start' },
      { type: 'accepted', destinationBaseHashes: { memory: HASH, disk: HASH } },
      { type: 'captured', round: 0, slices: 4, imageHashes: { memory: HASH, disk: HASH }, dirtyPages: 10, scannedBytes: 8192 },
      { type: 'result', result: { verified: false, reason: 'x', rebuiltHashes: { memory: '', disk: '' }, pagesWritten: 0, slices: 0, duplicateSlices: 0, rebuildSeconds: 0 } },
      { type: 'failed', stage: 'dedup', reason: 'malformed chunk' },
      { type: 'tuned', decision: { atSeconds: 1, from: 'a', to: 'b', bandwidthBps: 1, measuredBandwidthBps: 1, spareCores: 1, compressWorkers: 2, predictedCurrentBlocksPerSec: 3, predictedChosenBlocksPerSec: 4 } },
    ];
    for (const e of seeds) assert.deepEqual(parseEvent(encodeEvent(e)), e);
    const r = fuzz('parseEvent', jsonMutations(seeds, 20), (t) => parseEvent(Buffer.from(t as string)));
    assert.ok(r.refused > INPUTS / 4);
  });

  test('statistics on the bus', () => {
    const stats: StageStats = { stage: 'compress', instance: 'h:1', migrationId: 'fuzz-1', round: 0, seq: 1, part: 0, pages: 3, bytesIn: 100, bytesOut: 50, cpuMs: 1.2, wallMs: 2, mode: { delta: 'xor', compressor: 'zstd', level: 3 }, next: 'wire', counts: { blocks: 3 } };
    assert.deepEqual(parseStats(JSON.stringify(stats)), stats);
    const r = fuzz('parseStats', jsonMutations([stats], 30), (t) => parseStats(t as string));
    assert.ok(r.refused > INPUTS / 4);
  });

  test('link reports on the bus', () => {
    const seeds: LinkReport[] = [
      { type: 'probed', migrationId: 'fuzz-1', bandwidthBps: 48_000_000 },
      { type: 'measured', migrationId: 'fuzz-1', bandwidthBps: 49_000_000, averageBandwidthBps: 48_500_000, linkBoundShare: 0.75 },
      { type: 'measured', migrationId: 'fuzz-1', averageBandwidthBps: 0, linkBoundShare: 0 },
    ];
    for (const r of seeds) assert.deepEqual(parseLinkReport(encodeLinkReport(r)), r);
    assert.throws(() => parseLinkReport(JSON.stringify({ ...seeds[1], linkBoundShare: 1.5 })), /linkBoundShare 1\.5 is more than 1/);
    const r = fuzz('parseLinkReport', jsonMutations(seeds, 20), (t) => parseLinkReport(t as string));
    assert.ok(r.refused > INPUTS / 4);
  });

  test('descriptors and modes from the buckets are checked, never trusted', () => {
    const descriptor = {
      migrationId: 'fuzz-1',
      createdAtMs: 1,
      memory: { base: '/b', current: '/c', baseHash: HASH, bytes: 4096 },
      disk: { base: '/b', current: '/c', baseHash: HASH, bytes: 4096 },
      destination: 'h:1',
      parts: 1,
      chunkPages: 64,
      bandwidthCapBps: 0,
      mode: { delta: 'xor', compressor: 'zstd', level: 3 },
    };
    assert.ok(isDescriptor(descriptor));
    let rejected = 0;
    fuzz('descriptor', jsonMutations([descriptor], 40), (t) => {
      let v: unknown;
      try {
        v = JSON.parse(t as string);
      } catch {
        throw new MalformedMessageError('not JSON');
      }
      if (!isDescriptor(v)) rejected++;
      else assert.ok(Number.isInteger(v.parts) && v.parts >= 1 && v.parts <= 64 && v.chunkPages >= 1 && v.chunkPages <= 4096);
    });
    assert.ok(rejected > INPUTS / 4, `only ${rejected} descriptors rejected`);
    const modes = [...jsonMutations([{ delta: 'xor', compressor: 'zstd', level: 3 }], 41)].filter((t) => {
      try {
        return isMode(JSON.parse(t));
      } catch {
        return false;
      }
    });
    for (const t of modes) {
      const m = JSON.parse(t) as { level: number };
      assert.ok(Number.isInteger(m.level) && m.level >= 0 && m.level <= 22);
    }
  });
});
