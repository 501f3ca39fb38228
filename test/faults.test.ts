/**
 * Site faults at the source: a worker killed mid-migration, the bus restarted mid-migration, and a
 * bus that lets in only who holds its credentials. Nothing lost, never a wrong image.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { after, before, describe, test } from 'node:test';
import { nkeys } from '@nats-io/transport-node';
import { migrate } from '../cli/migrate.js';
import type { MigrationSummary } from '../cli/summary.js';
import { connectBus } from '../shared/bus/bus.js';
import { DEFAULT_MODE } from '../shared/model/mode.js';
import { startEmbeddedNats, type EmbeddedNats } from '../shared/bus/nats-server.js';
import { hashImageFile } from '../shared/image/pages.js';
import { makeWorkspace, migrateOptions, startDestination, type Destination, type Workspace } from './helpers/cloudlets.js';

let ws: Workspace;
before(async () => {
  ws = await makeWorkspace(16 << 20, 16 << 20, 31);
});
after(() => ws.cleanup());

async function assertIdentical(dest: Destination, summary: MigrationSummary): Promise<void> {
  assert.equal(summary.verified, true, summary.reason);
  assert.equal(await hashImageFile(join(dest.outDir, 'memory.img')), await hashImageFile(ws.images.memory), 'memory differs');
  assert.equal(await hashImageFile(join(dest.outDir, 'disk.img')), await hashImageFile(ws.images.disk), 'disk differs');
}

describe('source faults', { timeout: 300_000 }, () => {
  test('kill -9 a compress worker mid-migration: another does its chunks, images identical', async () => {
    const dest = await startDestination(ws, 'killed-worker');
    try {
      let killedPid: number | undefined;
      const summary = await migrate(
        migrateOptions(ws, dest.address, {
          compressWorkers: 2,
          // zstd -19 is slow: compression is still going on when the worker is killed
          mode: { delta: 'xor', compressor: 'zstd', level: 19 },
          bandwidthCapBps: 50e6,
          onStarted: ({ stats, actors }) => {
            const timer = setInterval(() => {
              // a worker that has finished a chunk (instances are named host:pid), so both did work
              const done = Object.keys(stats.stages.compress?.perInstance ?? {});
              const victim = actors.find((a) => a.name === 'compress' && done.some((i) => i.endsWith(`:${a.child.pid}`)));
              if (!victim) return;
              clearInterval(timer);
              killedPid = victim.child.pid;
              victim.child.kill('SIGKILL');
            }, 20);
          },
        }),
      );
      assert.ok(killedPid, 'no compress worker was killed (the migration ended first?)');
      await assertIdentical(dest, summary);
      // both workers did work: the killed one before it died, the other one the rest (incl. redeliveries)
      assert.equal(summary.stages.compress?.instances, 2);
    } finally {
      await dest.stop();
    }
  });

  test('nats-server restarted mid-migration (file storage): completes, or fails clearly and a retry succeeds', async () => {
    const storeDir = await mkdtemp(join(tmpdir(), 'handoff-restart-'));
    let nats: EmbeddedNats | undefined = await startEmbeddedNats({ storeDir, auth: { user: 'u', password: 'restart-test' } });
    const port = Number(/:(\d+)$/.exec(nats.url)![1]);
    const dest = await startDestination(ws, 'nats-restart');
    try {
      let restarted = false;
      const first = await migrate(
        migrateOptions(ws, dest.address, {
          natsUrl: nats.url,
          mode: DEFAULT_MODE,
          bandwidthCapBps: 30e6,
          onStarted: ({ stats }) => {
            const timer = setInterval(() => {
              if ((stats.stages.sender?.chunks ?? 0) < 1 || restarted) return;
              clearInterval(timer);
              restarted = true;
              void (async () => {
                await nats!.stop();
                nats = await startEmbeddedNats({ storeDir, port, auth: { user: 'u', password: 'restart-test' } });
              })();
            }, 20);
          },
        }),
      );
      assert.ok(restarted, 'the server was not restarted mid-migration');
      process.stderr.write(`nats-server restarted mid-migration: ${first.verified ? 'the handoff completed' : `failed (${first.reason}); retrying`}\n`);
      if (first.verified) {
        await assertIdentical(dest, first);
      } else {
        assert.match(first.reason ?? '', /NATS|nats|connection|unavailable|timeout/i, `unclear failure: ${first.reason}`);
        const retry = await migrate(migrateOptions(ws, dest.address, { natsUrl: nats.url, mode: DEFAULT_MODE }));
        await assertIdentical(dest, retry);
      }
    } finally {
      await dest.stop();
      await nats?.stop();
      await rm(storeDir, { recursive: true, force: true });
    }
  });
});

describe('NATS authentication', { timeout: 60_000 }, () => {
  test('user and password: refused without them, naming the cause; accepted with them', async () => {
    const nats = await startEmbeddedNats();
    try {
      const bare = nats.url.replace(/\/\/[^@]*@/, '//');
      assert.notEqual(bare, nats.url, 'the embedded server should have credentials');
      await assert.rejects(connectBus(bare, 'intruder'), /cannot connect to NATS at nats:\/\/127\.0\.0\.1:\d+: .*(authori[sz]ation|auth).*credentials/i);
      const bus = await connectBus(nats.url, 'friend');
      await bus.close();
    } finally {
      await nats.stop();
    }
  });

  test('an nkey: the seed from the environment is accepted, another is refused', async () => {
    const user = nkeys.createUser();
    const nats = await startEmbeddedNats({ auth: { nkey: user.getPublicKey() } });
    const saved = process.env.HANDOFF_NATS_NKEY_SEED;
    try {
      process.env.HANDOFF_NATS_NKEY_SEED = new TextDecoder().decode(user.getSeed());
      const bus = await connectBus(nats.url, 'nkey-user');
      await bus.close();
      process.env.HANDOFF_NATS_NKEY_SEED = new TextDecoder().decode(nkeys.createUser().getSeed());
      await assert.rejects(connectBus(nats.url, 'other-nkey'), /cannot connect to NATS/);
    } finally {
      if (saved === undefined) delete process.env.HANDOFF_NATS_NKEY_SEED;
      else process.env.HANDOFF_NATS_NKEY_SEED = saved;
      await nats.stop();
    }
  });
});
