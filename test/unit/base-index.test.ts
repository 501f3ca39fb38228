/** The base's page index: built once, reused where the base is unchanged, also in a copy of the base folder. */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { imageDigest, loadBaseIndex } from '../../shared/image/base-index.js';

describe('base index', () => {
  test('is reused by a copy of the base folder that keeps its times, and rebuilt for a changed base', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'handoff-hidx-'));
    try {
      mkdirSync(join(dir, 'a'));
      const image = join(dir, 'a', 'memory.img');
      writeFileSync(image, Buffer.alloc(64 * 4096, 3));
      const built = await loadBaseIndex(image);
      execFileSync('cp', ['-a', join(dir, 'a'), join(dir, 'b')]);
      const copy = join(dir, 'b', 'memory.img');
      const indexBefore = statSync(`${copy}.hidx`).mtimeMs;
      assert.equal((await loadBaseIndex(copy)).contentHash, built.contentHash);
      assert.equal(statSync(`${copy}.hidx`).mtimeMs, indexBefore, 'the copied index was built again');
      // a changed base (its mtime moves) gets a new index, with the new content's hash
      writeFileSync(copy, Buffer.alloc(64 * 4096, 4));
      utimesSync(copy, new Date(), new Date(Date.now() + 5000));
      const rebuilt = await loadBaseIndex(copy);
      assert.notEqual(rebuilt.contentHash, built.contentHash);
      assert.equal(rebuilt.contentHash, await imageDigest(copy));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a base whose index cannot be written still loads, with the same digest (the index kept in memory)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'handoff-hidx-'));
    try {
      const image = join(dir, 'memory.img');
      writeFileSync(image, Buffer.alloc(64 * 4096, 5));
      // the index's temporary file taken by a folder: its write fails (root writes any folder, so a
      // permission alone would not)
      mkdirSync(`${image}.hidx.${process.pid}.tmp`);
      const loaded = await loadBaseIndex(image);
      assert.equal(loaded.pages, 64);
      assert.equal(loaded.contentHash, await imageDigest(image));
      assert.throws(() => statSync(`${image}.hidx`), /ENOENT/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
