/** The tuner's wish for compress workers: the largest of the migrations', written when it changes and again before it expires. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { WISH_REFRESH_MS, WorkersWish } from '../../services/tuner/workers.js';

describe('compress workers wish', () => {
  test('the largest wish is written when it changes, again before it expires, and once more when none is left', () => {
    const wish = new WorkersWish();
    assert.equal(wish.due(0), false, 'nothing wished, nothing written');
    assert.equal(wish.set('a', 1), true);
    assert.equal(wish.set('b', 2), true);
    assert.equal(wish.set('b', 2), false);
    assert.equal(wish.wanted, 2);
    assert.equal(wish.due(0), true);
    wish.wrote(2, 0);
    assert.equal(wish.due(WISH_REFRESH_MS - 1), false);
    assert.equal(wish.due(WISH_REFRESH_MS), true, 'refreshed well inside its age');
    wish.wrote(2, WISH_REFRESH_MS);
    wish.keepOnly(new Set(['a']));
    assert.equal(wish.wanted, 1);
    assert.equal(wish.due(WISH_REFRESH_MS), true);
    wish.wrote(1, WISH_REFRESH_MS);
    wish.forget('a');
    assert.equal(wish.wanted, undefined);
    assert.equal(wish.due(WISH_REFRESH_MS), true, 'every worker in use again');
    wish.wrote(undefined, WISH_REFRESH_MS);
    assert.equal(wish.due(10 * WISH_REFRESH_MS), false);
  });
});
