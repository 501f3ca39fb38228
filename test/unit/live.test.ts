/** Live handoff's pure parts: the round policy, later rounds' change detection, the device-state patch. */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { changedPagesOf, dirtyPagesOf, newPageRecord } from '../../services/capture/core.js';
import { decideAfterRound } from '../../services/capture/policy.js';
import { decodePatch, encodePatch } from '../../shared/codecs/patch.js';
import { MalformedMessageError } from '../../shared/model/errors.js';
import { PAGE_SIZE, STRONG_HASH_BYTES, digestOfPageHashes, strongHash } from '../../shared/image/pages.js';

const policy = { downtimeMs: 300, maxRounds: 5, overheadMs: 100 };

describe('round policy', () => {
  test('one round is not enough to judge when its pages would not fit the downtime', () => {
    assert.equal(decideAfterRound([{ round: 0, dirtyPages: 5000, seconds: 10 }], policy).final, false);
  });

  test('stops when the next round is predicted to fit the downtime target', () => {
    // 500 pages/s delivered, 40 pages/s dirtied: the next round ~ 40 * 0.2 s = 8 pages -> ~16 ms + 100 ms
    const d = decideAfterRound([{ round: 0, dirtyPages: 5000, seconds: 10 }, { round: 1, dirtyPages: 100, seconds: 0.2 }], policy);
    assert.equal(d.final, true, d.reason);
    assert.ok(d.predictedDowntimeMs < 300);
    assert.match(d.reason, /fits 300 ms/);
  });

  test('goes on while rounds shrink and the prediction is above target', () => {
    const d = decideAfterRound([{ round: 0, dirtyPages: 5000, seconds: 10 }, { round: 1, dirtyPages: 2000, seconds: 4 }], policy);
    assert.equal(d.final, false, d.reason);
  });

  test('stops when rounds stop shrinking (the guest dirties as fast as we send)', () => {
    const d = decideAfterRound([{ round: 0, dirtyPages: 5000, seconds: 10 }, { round: 1, dirtyPages: 4800, seconds: 9.6 }], policy);
    assert.equal(d.final, true);
    assert.match(d.reason, /stopped shrinking/);
  });

  test('stops at the round limit, and at once when nothing is dirty', () => {
    const history = [5000, 2500, 1250, 625, 400].map((dirtyPages, round) => ({ round, dirtyPages, seconds: dirtyPages / 500 }));
    assert.match(decideAfterRound(history, policy).reason, /round limit 5/);
    assert.equal(decideAfterRound([{ round: 0, dirtyPages: 0, seconds: 0.1 }], policy).final, true);
  });
});

describe('later rounds', () => {
  test('find exactly the pages changed since the round before, and keep the digest right', () => {
    const pages = 64;
    const image = randomBytes(pages * PAGE_SIZE);
    const record = newPageRecord(pages);
    // round 0 against an empty reference: every page, and the record filled
    const round0 = dirtyPagesOf(image, 0, Buffer.alloc(pages * STRONG_HASH_BYTES), undefined, record);
    assert.equal(round0.length, pages);
    for (const p of [3, 17, 63]) image[p * PAGE_SIZE + 100]! ^= 0xff;
    const round1 = changedPagesOf(image, 0, record);
    assert.deepEqual(round1.map((d) => d.index), [3, 17, 63]);
    assert.equal(changedPagesOf(image, 0, record).length, 0, 'a page reported twice');
    const hashes = Buffer.alloc(pages * STRONG_HASH_BYTES);
    for (let p = 0; p < pages; p++) strongHash(image.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)).copy(hashes, p * STRONG_HASH_BYTES);
    assert.equal(digestOfPageHashes(record.strong), digestOfPageHashes(hashes));
  });
});

describe('later rounds over live memory', () => {
  test('a page changed and changed back is sent again: the record holds what was sent, not what was hashed first', () => {
    const pages = 40; // not whole groups: the last group is short
    const image = randomBytes(pages * PAGE_SIZE);
    const record = newPageRecord(pages);
    dirtyPagesOf(image, 0, Buffer.alloc(pages * STRONG_HASH_BYTES), undefined, record);
    const original = Buffer.from(image.subarray(5 * PAGE_SIZE, 6 * PAGE_SIZE));
    image[5 * PAGE_SIZE]! ^= 0xff;
    image[39 * PAGE_SIZE + 7]! ^= 0xff;
    const sent = changedPagesOf(image, 0, record);
    assert.deepEqual(sent.map((d) => d.index), [5, 39]);
    // what was sent is a copy: later writes to the image do not change it
    const sentPage = Buffer.from(sent[0]!.page);
    image[5 * PAGE_SIZE + 1]! ^= 0xff;
    assert.ok(Buffer.from(sent[0]!.page).equals(sentPage));
    // back to the content of round 0: still different from what the destination has
    original.copy(image, 5 * PAGE_SIZE);
    assert.deepEqual(changedPagesOf(image, 0, record).map((d) => d.index), [5]);
    assert.equal(changedPagesOf(image, 0, record).length, 0);
  });

  test('refuses a block that does not start at a group', () => {
    const record = newPageRecord(64);
    assert.throws(() => changedPagesOf(Buffer.alloc(PAGE_SIZE), 3, record), /group/);
  });
});

describe('device state patch', () => {
  test('a state against its base is tiny and decodes to the same bytes; a damaged one is refused', () => {
    const base = randomBytes(800 * 1024);
    const state = Buffer.from(base);
    for (const at of [10, 5000, 400_000]) state[at]! ^= 0x55;
    const patch = encodePatch(state, base);
    assert.ok(patch.byteLength < 1000, `${patch.byteLength} bytes`);
    assert.ok(decodePatch(patch, base).equals(state));
    const damaged = Buffer.from(patch);
    damaged[damaged.length - 3]! ^= 0xff;
    assert.throws(() => decodePatch(damaged, base), MalformedMessageError);
    const huge = Buffer.from(patch);
    huge.writeUInt32LE(0xffffffff, 0);
    assert.throws(() => decodePatch(huge, base), /claims/);
  });
});
