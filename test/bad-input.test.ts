/** Bad input gets a clear error naming the cause, and never a wrong image. */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { copyFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { migrate } from '../cli/migrate.js';
import { createDedupActor } from '../services/dedup/service.js';
import { connectBus, publishWork } from '../shared/bus/bus.js';
import { BadImageError } from '../shared/model/errors.js';
import { loadBaseIndex } from '../shared/image/base-index.js';
import { DEFAULT_MODE } from '../shared/model/mode.js';
import type { MigrationDescriptor } from '../shared/model/migration.js';
import { parseEvent } from '../shared/model/migration.js';
import { startEmbeddedNats } from '../shared/bus/nats-server.js';
import { runStage } from '../shared/actor/stage.js';
import { DEAD_HEADERS, STREAMS, deadLetterSubject, eventSubject, workSubject } from '../shared/bus/subjects.js';
import { makeWorkspace, migrateOptions, startDestination, type Workspace } from './helpers/cloudlets.js';

let ws: Workspace;
before(async () => {
  ws = await makeWorkspace(4 << 20, 4 << 20, 11);
});
after(() => ws.cleanup());

describe('bad input', { timeout: 120_000 }, () => {
  test('missing image: names the file and the cause', async () => {
    const opts = migrateOptions(ws, '127.0.0.1:1', { memory: join(ws.dir, 'nope.img') });
    await assert.rejects(migrate(opts), (err: Error) => err instanceof BadImageError && /nope\.img cannot be read: ENOENT/.test(err.message));
  });

  test('truncated image (size not a multiple of 4 KiB)', async () => {
    const truncated = join(ws.dir, 'truncated.img');
    await copyFile(ws.images.disk, truncated);
    await truncate(truncated, (4 << 20) - 100);
    await assert.rejects(migrate(migrateOptions(ws, '127.0.0.1:1', { disk: truncated })), /truncated\.img is 4194204 bytes, not a multiple of 4096/);
  });

  test('current and base sizes differ', async () => {
    const shorter = join(ws.dir, 'shorter.img');
    await copyFile(ws.images.memory, shorter);
    await truncate(shorter, 2 << 20);
    await assert.rejects(migrate(migrateOptions(ws, '127.0.0.1:1', { memory: shorter })), /is 2097152 bytes but its base .* is 4194304: sizes must match/);
  });

  test('destination holds another base: refused before any page is sent, naming both hashes', async () => {
    const otherBase = join(ws.dir, 'destination', 'other-base-memory.img');
    await copyFile(ws.destBaseMemory, otherBase);
    await writeFile(otherBase, Buffer.alloc(4096, 0x5a), { flag: 'r+' });
    const dest = await startDestination(ws, 'refused', { memory: otherBase, disk: ws.destBaseDisk });
    try {
      const summary = await migrate(migrateOptions(ws, dest.address));
      const sourceHash = (await loadBaseIndex(ws.images.baseMemory)).contentHash;
      const destHash = (await loadBaseIndex(otherBase)).contentHash;
      assert.equal(summary.verified, false);
      assert.match(summary.reason!, /destination refused: destination base differs/);
      assert.ok(summary.reason!.includes(sourceHash) && summary.reason!.includes(destHash), summary.reason);
      assert.equal(summary.stages.capture, undefined, 'capture ran although the destination refused');
      assert.equal(summary.stages.sender, undefined, 'pages were sent although the destination refused');
      assert.equal(existsSync(join(dest.outDir, 'memory.img')), false);
    } finally {
      await dest.stop();
    }
  });

  test('malformed chunk on the bus: the migration fails naming the cause', async () => {
    const nats = await startEmbeddedNats();
    const bus = await connectBus(nats.url, 'test');
    const dedup = await runStage(createDedupActor(0), nats.url);
    try {
      const [m, d] = await Promise.all([loadBaseIndex(ws.images.baseMemory), loadBaseIndex(ws.images.baseDisk)]);
      const descriptor: MigrationDescriptor = {
        migrationId: 'bad-chunk',
        createdAtMs: Date.now(),
        memory: { base: ws.images.baseMemory, current: ws.images.memory, baseHash: m.contentHash, bytes: m.bytes },
        disk: { base: ws.images.baseDisk, current: ws.images.disk, baseHash: d.contentHash, bytes: d.bytes },
        destination: '127.0.0.1:1',
        parts: 1,
        chunkPages: 64,
        bandwidthCapBps: 0,
        mode: DEFAULT_MODE,
      };
      await bus.migrations.put('bad-chunk', JSON.stringify(descriptor));
      const events = await (await bus.js.consumers.get(STREAMS.events, { filter_subjects: eventSubject('bad-chunk', 'failed') })).consume();
      await publishWork(bus, workSubject('dedup', 'bad-chunk'), Buffer.from('definitely not a chunk'), 'garbage-1');
      for await (const msg of events) {
        const event = parseEvent(msg.data);
        assert.equal(event.type, 'failed');
        if (event.type === 'failed') {
          assert.equal(event.stage, 'dedup');
          assert.match(event.reason, /malformed chunk/);
        }
        break;
      }
      // the message itself is kept as a dead letter, with the reason
      const dead = await bus.jsm.streams.getMessage(STREAMS.dead, { last_by_subj: deadLetterSubject('dedup', 'bad-chunk') });
      assert.ok(dead, 'no dead letter');
      assert.equal(Buffer.from(dead.data).toString(), 'definitely not a chunk');
      assert.match(dead.header.get(DEAD_HEADERS.reason), /malformed chunk/);
      assert.equal(dead.header.get(DEAD_HEADERS.subject), workSubject('dedup', 'bad-chunk'));
    } finally {
      await dedup.stop();
      await bus.close();
      await nats.stop();
    }
  });
});
