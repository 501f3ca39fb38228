/** The chunk codec: round trips, and every malformation refused with its cause (and fuzzed). */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { Packr } from 'msgpackr';
import { PageKind, type Chunk } from '../../shared/model/chunk.js';
import { decodeChunk, encodeChunk } from '../../shared/wire/chunk-codec.js';
import { MalformedMessageError } from '../../shared/model/errors.js';
import { PAGE_SIZE } from '../../shared/image/pages.js';

export function sampleChunk(withHash = false): Chunk {
  const n = 4;
  const chunk: Chunk = {
    migrationId: 'm-test_1',
    round: 2,
    seq: 77,
    part: 1,
    parts: 3,
    image: 1,
    mode: { delta: 'xor', compressor: 'none', level: 0 },
    pageIndex: Uint32Array.from([3, 9, 10, 4000000]),
    kind: Uint8Array.from([PageKind.Raw, PageKind.Zero, PageKind.Base, PageKind.Xor]),
    refImage: Uint8Array.from([0, 0, 1, 0]),
    refIndex: Uint32Array.from([0, 0, 12345, 0]),
    bodyLength: Uint32Array.from([PAGE_SIZE, 0, 0, 10]),
    check: randomBytes(n * 8),
    body: randomBytes(PAGE_SIZE + 10),
    bodyRawLength: PAGE_SIZE + 10,
  };
  if (withHash) chunk.strongHash = randomBytes(n * 16);
  return chunk;
}

const packr = new Packr({ useRecords: false });
function mutate(field: string, value: unknown): Uint8Array {
  const record = packr.unpack(encodeChunk(sampleChunk())) as Record<string, unknown>;
  record[field] = value;
  return packr.pack(record);
}

describe('chunk codec', () => {
  for (const withHash of [false, true]) {
    test(`round trip${withHash ? ' with strong hashes' : ''}`, () => {
      const chunk = sampleChunk(withHash);
      const back = decodeChunk(encodeChunk(chunk));
      for (const k of Object.keys(chunk) as (keyof Chunk)[]) {
        const a = chunk[k];
        const b = back[k];
        if (ArrayBuffer.isView(a)) {
          const bv = b as ArrayBufferView;
          assert.deepEqual(Buffer.from(bv.buffer, bv.byteOffset, bv.byteLength), Buffer.from(a.buffer, a.byteOffset, a.byteLength), k);
        }
        else assert.deepEqual(b, a, k);
      }
      assert.equal(back.strongHash === undefined, !withHash);
    });
  }

  const cases: [string, Uint8Array, RegExp][] = [
    ['not MessagePack', Buffer.from([0xc1, 0xc1, 0xc1]), /not MessagePack/],
    ['not a map', packr.pack([1, 2, 3]), /not a map/],
    ['wrong version', mutate('v', 9), /version 9/],
    ['bad migration id', mutate('mig', '../etc'), /migration id/],
    ['part out of range', mutate('part', 3), /part out of range/],
    ['image not 0 or 1', mutate('image', 2), /image is not 0/],
    ['invalid mode', mutate('mode', { delta: 'rot13', compressor: 'none', level: 0 }), /mode is not a valid mode/],
    ['patch with a compressor other than zstd', mutate('mode', { delta: 'patch', compressor: 'lz4', level: 0 }), /mode is not a valid mode/],
    ['patch chunk with a page delta-encoded on its own', mutate('mode', { delta: 'patch', compressor: 'zstd', level: 3 }), /page 3 of a patch chunk is delta-encoded on its own/],
    ['column length mismatch', mutate('idx', Buffer.alloc(3)), /field idx has 3 bytes, expected 16/],
    ['unknown page kind', mutate('kind', Uint8Array.from([0, 1, 2, 9])), /unknown kind 9/],
    ['raw page with a short body', mutate('len', Buffer.from(Uint32Array.from([100, 0, 0, 10]).buffer)), /raw page 0 has body 100/],
    ['reference page with a body', mutate('len', Buffer.from(Uint32Array.from([PAGE_SIZE, 5, 0, 10]).buffer)), /reference page 1 has a body/],
    ['raw length mismatch', mutate('rawLen', 5), /add up to 4106, header says 5/],
    ['uncompressed body of the wrong size', mutate('body', Buffer.alloc(10)), /uncompressed body has 10 bytes/],
  ];
  for (const [name, bytes, why] of cases) {
    test(`refuses: ${name}`, () => {
      assert.throws(
        () => decodeChunk(bytes),
        (err: Error) => err instanceof MalformedMessageError && /^malformed chunk: /.test(err.message) && why.test(err.message),
      );
    });
  }

  test('fuzz: 3000 mutated chunks decode or fail as malformed, nothing else', () => {
    const valid = Buffer.from(encodeChunk(sampleChunk(true)));
    let refused = 0;
    for (let i = 0; i < 3000; i++) {
      const bytes = Buffer.from(valid);
      const flips = 1 + (i % 8);
      for (let f = 0; f < flips; f++) {
        const at = (i * 7919 + f * 104729) % bytes.length;
        bytes[at] = bytes[at]! ^ (1 << ((i + f) % 8));
      }
      const input = i % 5 === 0 ? bytes.subarray(0, (i * 31) % bytes.length) : bytes;
      try {
        decodeChunk(input);
      } catch (err) {
        assert.ok(err instanceof MalformedMessageError, `input ${i}: ${(err as Error).name}: ${(err as Error).message}`);
        refused++;
      }
    }
    assert.ok(refused > 1000, `only ${refused} refused`);
  });
});
