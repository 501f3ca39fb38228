/**
 * XOR delta against the base page at the same index, zero runs squeezed (XBZRLE's idea, as in
 * QEMU's migration/xbzrle.c): records of [zero run: varint][literal length: varint][literal xor bytes].
 */
import { MalformedMessageError } from '../model/errors.js';
import { PAGE_SIZE } from '../image/pages.js';

function putVarint(out: Uint8Array, at: number, value: number): number {
  while (value >= 0x80) {
    out[at++] = (value & 0x7f) | 0x80;
    value >>>= 7;
  }
  out[at++] = value;
  return at;
}

/** Zero runs shorter than this are cheaper kept inside a literal than as a record boundary. */
const MIN_ZERO_RUN = 3;

/**
 * Encodes `page` against `base`. Returns undefined when the encoding would not be smaller than
 * `limit` bytes (default: a page): the caller then sends the page as it is.
 */
export function xorEncode(page: Uint8Array, base: Uint8Array, limit = PAGE_SIZE): Uint8Array | undefined {
  const out = new Uint8Array(PAGE_SIZE + 16);
  let at = 0;
  let i = 0;
  while (i < PAGE_SIZE) {
    const zeroStart = i;
    while (i < PAGE_SIZE && page[i] === base[i]) i++;
    if (i === PAGE_SIZE) break; // trailing zeros are implied
    const zeroRun = i - zeroStart;
    const litStart = i;
    // extend the literal until a zero run long enough to be worth a new record
    let run = 0;
    while (i < PAGE_SIZE) {
      if (page[i] === base[i]) {
        run++;
        if (run >= MIN_ZERO_RUN) break;
      } else run = 0;
      i++;
    }
    const litEnd = i - (i < PAGE_SIZE ? run - 1 : run);
    i = litEnd;
    at = putVarint(out, at, zeroRun);
    at = putVarint(out, at, litEnd - litStart);
    if (at + (litEnd - litStart) >= limit) return undefined;
    for (let k = litStart; k < litEnd; k++) out[at++] = page[k]! ^ base[k]!;
  }
  if (at === 0) at = putVarint(out, putVarint(out, 0, 0), 0); // identical page: one empty record
  return at < limit ? out.slice(0, at) : undefined;
}

function getVarint(body: Uint8Array, pos: { at: number }): number {
  let value = 0;
  for (let shift = 0; shift < 21; shift += 7) {
    if (pos.at >= body.byteLength) throw new MalformedMessageError('xor delta: truncated varint');
    const b = body[pos.at++]!;
    value |= (b & 0x7f) << shift;
    if (b < 0x80) return value;
  }
  throw new MalformedMessageError('xor delta: varint too long');
}

export function xorDecode(body: Uint8Array, base: Uint8Array): Uint8Array {
  const page = new Uint8Array(base.subarray(0, PAGE_SIZE));
  const pos = { at: 0 };
  let i = 0;
  while (pos.at < body.byteLength) {
    i += getVarint(body, pos);
    const len = getVarint(body, pos);
    if (i + len > PAGE_SIZE) throw new MalformedMessageError('xor delta: runs past the end of the page');
    if (pos.at + len > body.byteLength) throw new MalformedMessageError('xor delta: truncated literal');
    for (let k = 0; k < len; k++) page[i + k]! ^= body[pos.at + k]!;
    pos.at += len;
    i += len;
  }
  return page;
}
