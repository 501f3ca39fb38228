/** WAN framing: reassembly from any split, and refusal of corrupted, oversized or foreign frames. */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { MalformedMessageError } from '../../shared/model/errors.js';
import { FRAME_HEADER_BYTES, FrameReader, FrameType, MAX_FRAME_PAYLOAD, encodeAckFrame, encodeChunkFrame, encodeFrame, encodeJsonFrame, parseAddress, splitChunkFrame } from '../../shared/wire/frames.js';

describe('frames', () => {
  const frames = [encodeJsonFrame(FrameType.Hello, { migrationId: 'x' }), Buffer.concat(encodeChunkFrame(7, randomBytes(3000))), encodeAckFrame(7), encodeJsonFrame(FrameType.Result, { verified: true })];
  const stream = Buffer.concat(frames);

  test('all at once, and one byte at a time, give the same frames', () => {
    const whole = new FrameReader().push(stream);
    assert.equal(whole.length, 4);
    const reader = new FrameReader();
    const bytewise = [];
    for (let i = 0; i < stream.length; i++) bytewise.push(...reader.push(stream.subarray(i, i + 1)));
    assert.deepEqual(bytewise, whole);
    assert.deepEqual(whole.map((f) => f.type), [FrameType.Hello, FrameType.Chunk, FrameType.Ack, FrameType.Result]);
    const { frameNo, chunk } = splitChunkFrame(whole[1]!.payload);
    assert.equal(frameNo, 7);
    assert.deepEqual(chunk, frames[1]!.subarray(FRAME_HEADER_BYTES + 4));
  });

  test('a truncated frame stays pending', () => {
    const reader = new FrameReader();
    assert.deepEqual(reader.push(frames[1]!.subarray(0, 100)), []);
    assert.equal(reader.pendingBytes, 100);
  });

  test('a flipped payload bit is a checksum mismatch', () => {
    const bad = Buffer.from(frames[1]!);
    bad[FRAME_HEADER_BYTES + 50] = bad[FRAME_HEADER_BYTES + 50]! ^ 4;
    assert.throws(() => new FrameReader().push(bad), /checksum mismatch/);
  });

  test('bad magic, unknown type, newer version and oversize length are refused before reading on', () => {
    const magic = Buffer.from(frames[0]!);
    magic[0] = 0x47;
    assert.throws(() => new FrameReader().push(magic), /bad magic/);
    const type = Buffer.from(frames[0]!);
    type[3] = 99;
    assert.throws(() => new FrameReader().push(type), /unknown type 99/);
    const version = Buffer.from(frames[0]!);
    version[2] = 2;
    assert.throws(() => new FrameReader().push(version), /protocol version 2/);
    const huge = Buffer.from(frames[0]!.subarray(0, FRAME_HEADER_BYTES));
    huge.writeUInt32LE(MAX_FRAME_PAYLOAD + 1, 4);
    assert.throws(() => new FrameReader().push(huge), (e: Error) => e instanceof MalformedMessageError && /exceeds/.test(e.message));
  });

  test('a chunk frame shorter than its number is refused', () => {
    assert.throws(() => splitChunkFrame(Buffer.alloc(2)), MalformedMessageError);
  });

  test('a frame with an empty payload is read (it once made the reader loop forever)', () => {
    const reader = new FrameReader();
    const empty = encodeFrame(FrameType.Ack, Buffer.alloc(0));
    const frames = reader.push(Buffer.concat([empty, encodeAckFrame(7)]));
    assert.deepEqual(frames.map((f) => [f.type, f.payload.byteLength]), [[FrameType.Ack, 0], [FrameType.Ack, 4]]);
    assert.equal(reader.pendingBytes, 0);
  });

  test('fuzz: random bytes never crash the reader', () => {
    for (let i = 0; i < 2000; i++) {
      try {
        new FrameReader().push(randomBytes(1 + (i % 64)));
      } catch (err) {
        assert.ok(err instanceof MalformedMessageError);
      }
    }
  });
});

describe('addresses', () => {
  test('HOST:PORT, IPv6 in brackets, port 0 only to listen', () => {
    assert.deepEqual(parseAddress('10.0.0.1:7300'), { host: '10.0.0.1', port: 7300 });
    assert.deepEqual(parseAddress('[::1]:80'), { host: '::1', port: 80 });
    assert.deepEqual(parseAddress('localhost:0', true), { host: 'localhost', port: 0 });
    for (const bad of ['localhost', ':80', 'h:0', 'h:65536', 'h:x']) assert.throws(() => parseAddress(bad), /bad address/, bad);
  });
});
