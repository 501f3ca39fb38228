/** The receiver's pure parts: its checks of a handshake, a rebuild's result, the results' order. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ResultQueue } from '../../services/receiver/migration.js';
import { failedResult, refusalOf, verifiedResult, type Destination } from '../../services/receiver/verify.js';
import type { Hello } from '../../shared/wire/frames.js';

const BASE = { memory: 'aa', disk: 'bb' };
const destination: Destination = { baseHashes: BASE, bytes: { memory: 4096, disk: 8192 }, resumesVms: false };
const hello = (extra: Partial<Hello> = {}): Hello => ({ migrationId: 'm1', baseHashes: BASE, bytes: { memory: 4096, disk: 8192 }, ...extra });
const counts = { pagesWritten: 3, slices: 2, duplicateSlices: 0 };

describe('receiver', () => {
  test('takes a handshake from a source with its base; refuses another base, other sizes, a VM it cannot resume', () => {
    assert.equal(refusalOf(hello(), destination), undefined);
    assert.match(refusalOf(hello({ baseHashes: { memory: 'aa', disk: 'cc' } }), destination)!, /^destination base differs from the source's: .*disk source cc destination bb$/);
    assert.match(refusalOf(hello({ bytes: { memory: 4096, disk: 4096 } }), destination)!, /^image sizes differ: source memory 4096 disk 4096, destination base memory 4096 disk 8192$/);
    const vm = { memoryBytes: 4096 } as NonNullable<Hello['vm']>;
    assert.match(refusalOf(hello({ vm }), destination)!, /cannot resume VMs/);
    assert.equal(refusalOf(hello({ vm }), { ...destination, resumesVms: true }), undefined);
    assert.match(refusalOf(hello({ vm: { ...vm, memoryBytes: 8192 } }), { ...destination, resumesVms: true })!, /^the VM has 8192 bytes of memory, the base memory image 4096$/);
  });

  test("a rebuild is verified where both images hash to the source's; the result names those that differ", () => {
    assert.deepEqual(verifiedResult(BASE, BASE, counts, 1.5), { verified: true, rebuiltHashes: BASE, ...counts, rebuildSeconds: 1.5 });
    const r = verifiedResult({ memory: 'xx', disk: 'bb' }, BASE, counts, 1);
    assert.equal(r.verified, false);
    assert.equal(r.reason, "rebuilt memory image hash differs from the source's (memory: source aa, rebuilt xx)");
    assert.deepEqual(failedResult('chunk rejected', counts, 2), { verified: false, reason: 'chunk rejected', rebuiltHashes: { memory: '', disk: '' }, ...counts, rebuildSeconds: 2 });
  });

  test('results go to whoever asks, in the order they came', async () => {
    const q = new ResultQueue<number>();
    const waiting = q.next();
    q.push(1);
    q.push(2);
    q.push(3);
    assert.equal(await waiting, 1);
    assert.equal(await q.next(), 2);
    assert.equal(await q.next(), 3);
  });
});

describe('receiver store', () => {
  test('the rebuilt images start as sparse copies of their bases: holes stay holes, pages read as the base', async () => {
    const { mkdtempSync, openSync, writeSync, closeSync, ftruncateSync, statSync, rmSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const { FilePageStore } = await import('../../services/receiver/store.js');
    const dir = mkdtempSync(join(tmpdir(), 'handoff-store-'));
    try {
      const bytes = 64 << 20;
      const bases = ['memory', 'disk'].map((name) => {
        const path = join(dir, `base-${name}.img`);
        const fd = openSync(path, 'w');
        ftruncateSync(fd, bytes);
        writeSync(fd, Buffer.alloc(4096, 7), 0, 4096, 5 * 4096);
        closeSync(fd);
        return path;
      });
      const store = new FilePageStore([
        { base: bases[0]!, out: join(dir, 'memory.img'), bytes },
        { base: bases[1]!, out: join(dir, 'disk.img'), bytes },
      ]);
      try {
        await store.ready;
        assert.equal(Buffer.from(store.readRebuilt(1, 5)).equals(Buffer.alloc(4096, 7)), true);
        for (const out of ['memory.img', 'disk.img']) {
          const s = statSync(join(dir, `${out}.partial`));
          assert.equal(s.size, bytes);
          assert.ok(s.blocks * 512 < bytes / 8, `${out}.partial takes ${s.blocks * 512} bytes on disk: not sparse`);
        }
      } finally {
        store.close();
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a base that cannot be copied fails the store's start, naming the base and cp's reason", async () => {
    const { mkdtempSync, writeFileSync, rmSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const { FilePageStore } = await import('../../services/receiver/store.js');
    const dir = mkdtempSync(join(tmpdir(), 'handoff-store-'));
    try {
      const base = join(dir, 'base.img');
      writeFileSync(base, Buffer.alloc(8192));
      // the rebuilt image's folder does not exist: cp cannot create it
      const store = new FilePageStore([
        { base, out: join(dir, 'missing', 'memory.img'), bytes: 8192 },
        { base, out: join(dir, 'disk.img'), bytes: 8192 },
      ]);
      await assert.rejects(store.ready, (err: Error) => err.message.includes(`cannot copy the base ${base}`) && /No such file or directory/.test(err.message));
      assert.throws(() => store.readRebuilt(0, 0), /before the copy of its base was done/);
      store.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
