/** Round trips of every encoding, and decoders that refuse bad bodies instead of returning wrong pages. */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { BlockCompressor, BlockDecompressor } from '../../shared/codecs/block.js';
import { xorDecode, xorEncode } from '../../shared/codecs/xor.js';
import { ZstdDeltaDecoder, ZstdDeltaEncoder } from '../../shared/codecs/zstd-delta.js';
import { MalformedMessageError } from '../../shared/model/errors.js';
import { PAGE_SIZE } from '../../shared/image/pages.js';

function variants(base: Buffer): [string, Buffer][] {
  const one = Buffer.from(base);
  one[2047] = one[2047]! ^ 0xff;
  const first = Buffer.from(base);
  first[0] = first[0]! ^ 1;
  const last = Buffer.from(base);
  last[PAGE_SIZE - 1] = last[PAGE_SIZE - 1]! ^ 1;
  const scattered = Buffer.from(base);
  for (let i = 5; i < PAGE_SIZE; i += 97) scattered[i] = scattered[i]! ^ 0x5a;
  const run = Buffer.from(base);
  run.fill(0x42, 1000, 1300);
  return [
    ['identical', Buffer.from(base)],
    ['one byte', one],
    ['first byte', first],
    ['last byte', last],
    ['scattered', scattered],
    ['a run', run],
    ['zero page', Buffer.alloc(PAGE_SIZE)],
    ['all random', randomBytes(PAGE_SIZE)],
  ];
}

const bases: [string, Buffer][] = [
  ['random base', randomBytes(PAGE_SIZE)],
  ['text base', Buffer.from('the quick brown fox jumps over the lazy dog\n'.repeat(100)).subarray(0, PAGE_SIZE)],
  ['zero base', Buffer.alloc(PAGE_SIZE)],
];

describe('xor delta', () => {
  for (const [baseName, base] of bases) {
    for (const [name, page] of variants(base)) {
      test(`${baseName}, ${name}: decodes to the page, or declines when not smaller`, () => {
        const body = xorEncode(page, base);
        if (body === undefined) {
          assert.ok(name === 'all random' || baseName === 'zero base' || name === 'zero page', `declined ${name}`);
          return;
        }
        assert.ok(body.byteLength < PAGE_SIZE);
        assert.deepEqual(Buffer.from(xorDecode(body, base)), page);
      });
    }
  }
  test('a small change encodes small', () => {
    const [, base] = bases[0]!;
    const page = Buffer.from(base);
    page[100] = page[100]! ^ 1;
    assert.ok(xorEncode(page, base)!.byteLength <= 4);
  });
  test('limit: declines when the encoding would not beat it', () => {
    const base = randomBytes(PAGE_SIZE);
    const page = Buffer.from(base);
    page.fill(1, 0, 200);
    assert.equal(xorEncode(page, base, 100), undefined);
    assert.ok(xorEncode(page, base, 300));
  });
  test('bad bodies are refused', () => {
    const base = randomBytes(PAGE_SIZE);
    assert.throws(() => xorDecode(Buffer.from([0x80]), base), MalformedMessageError); // truncated varint
    assert.throws(() => xorDecode(Buffer.from([0x00, 0x05, 1, 2]), base), MalformedMessageError); // truncated literal
    assert.throws(() => xorDecode(Buffer.from([0x80, 0x20, 0x01, 0x01]), base), /runs past the end/); // 4096 equal bytes, then one more
    assert.throws(() => xorDecode(Buffer.from([0xff, 0xff, 0xff, 0xff]), base), MalformedMessageError); // varint too long
  });
});

describe('zstd delta (base page as dictionary)', () => {
  const enc = new ZstdDeltaEncoder();
  const dec = new ZstdDeltaDecoder();
  for (const [baseName, base] of bases) {
    for (const [name, page] of variants(base)) {
      test(`${baseName}, ${name}`, () => {
        const body = enc.encode(page, base);
        if (body === undefined) {
          assert.equal(name, 'all random');
          return;
        }
        assert.deepEqual(Buffer.from(dec.decode(body, base)), page);
      });
    }
  }
  test('garbage and a body for another length are refused', () => {
    const base = randomBytes(PAGE_SIZE);
    assert.throws(() => dec.decode(randomBytes(50), base), MalformedMessageError);
    const short = new BlockCompressor().compress(Buffer.alloc(100, 1), 'zstd', 3);
    assert.throws(() => dec.decode(short, base), /decoded 100 bytes, expected 4096/);
  });
});

describe('block compression', () => {
  const c = new BlockCompressor();
  const d = new BlockDecompressor();
  const bodies: [string, Buffer][] = [
    ['empty', Buffer.alloc(0)],
    ['text', Buffer.from('handoff '.repeat(20000))],
    ['random', randomBytes(100_000)],
    ['mixed', Buffer.concat([randomBytes(5000), Buffer.alloc(50000), randomBytes(100)])],
  ];
  for (const [compressor, level] of [['none', 0], ['lz4', 0], ['zstd', 1], ['zstd', 3], ['zstd', 19]] as const) {
    for (const [name, body] of bodies) {
      test(`${compressor}:${level} ${name}`, () => {
        const packed = c.compress(body, compressor, level);
        if (name === 'text' && compressor !== 'none') assert.ok(packed.byteLength < body.byteLength / 10);
        assert.deepEqual(Buffer.from(d.decompress(packed, compressor, body.byteLength)), body);
      });
    }
  }
  test('a higher zstd level is not larger on text', () => {
    const text = Buffer.from(Array.from({ length: 5000 }, (_, i) => `line ${i % 97} of ${i % 13}`).join('\n'));
    assert.ok(c.compress(text, 'zstd', 19).byteLength <= c.compress(text, 'zstd', 1).byteLength);
  });
  test('bodies that lie about their size are refused before allocating', () => {
    const body = Buffer.from('abc'.repeat(1000));
    const lz4 = Buffer.from(c.compress(body, 'lz4', 0));
    assert.throws(() => d.decompress(lz4, 'lz4', body.byteLength + 1), /lz4 body: claims 3000 bytes, expected 3001/);
    lz4.writeUInt32LE(0xffffffff, 0);
    assert.throws(() => d.decompress(lz4, 'lz4', body.byteLength), MalformedMessageError);
    const zstd = c.compress(body, 'zstd', 3);
    assert.throws(() => d.decompress(zstd, 'zstd', body.byteLength - 1), MalformedMessageError);
    assert.throws(() => d.decompress(zstd, 'zstd', body.byteLength + 10), /decoded 3000 bytes, expected 3010/);
    assert.throws(() => d.decompress(randomBytes(64), 'zstd', 1000), MalformedMessageError);
    assert.throws(() => d.decompress(Buffer.alloc(10), 'none', 11), MalformedMessageError);
  });
});
