/**
 * Compress workers join and leave while a migration runs: they share its work (each one's chunks
 * in the summary) and the images arrive identical. A worker that leaves (SIGTERM) finishes or hands
 * back its chunks and exits cleanly; workers the tuner does not want take no work until the wish
 * ends; health and readiness answer over HTTP. Also the bus helpers they coordinate by: the view of
 * the workers bucket, the descriptors an actor prepares for ahead, and the wait for a migration's first event
 * of a kind (capture's for the tuner's first look).
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { spawnActor, stopActors, type ActorProcess } from '../cli/actors.js';
import { migrate } from '../cli/migrate.js';
import { spawnReceiverProcess } from '../cli/receive.js';
import type { MigrationSummary } from '../cli/summary.js';
import { JS_DOMAIN, migrateOn, startTwoHosts } from '../load/lib/hosts.js';
import { stopProcess } from '../shared/actor/child.js';
import { startEmbeddedNats, type EmbeddedNats } from '../shared/bus/nats-server.js';
import { connectBus, firstEvent, publishEvent } from '../shared/bus/bus.js';
import { PRESENCE_TTL_MS, PresenceView, liveWorkers, setWantedWorkers, workersBucket } from '../shared/bus/presence.js';
import { hashImageFile } from '../shared/image/pages.js';
import { readProcStat } from '../shared/cpu/proc-stat.js';
import { HEAD_START_CHUNKS, encodeEvent, type MigrationDescriptor } from '../shared/model/migration.js';
import { DescriptorCache, EndedMigrationError, UnknownMigrationError } from '../shared/bus/registry.js';
import { loadBaseIndex } from '../shared/image/base-index.js';
import { createLogger } from '../shared/telemetry/log.js';
import { ADAPTIVE_START_MODE } from '../shared/model/mode.js';
import { STREAMS, eventSubject, workSubject } from '../shared/bus/subjects.js';
import { captureRound, type CaptureGate } from '../services/capture/round.js';
import { makeWorkspace, migrateOptions, startDestination, type Workspace } from './helpers/cloudlets.js';

let ws: Workspace;
let nats: EmbeddedNats;
before(async () => {
  ws = await makeWorkspace(32 << 20, 32 << 20, 61);
  nats = await startEmbeddedNats();
});
after(async () => {
  await nats.stop();
  await ws.cleanup();
});

const exitOf = (a: ActorProcess): Promise<number | null> =>
  a.child.exitCode !== null ? Promise.resolve(a.child.exitCode) : new Promise((resolve) => a.child.once('exit', (code) => resolve(code)));

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as { port: number };
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

/** the processes of a process group (a command spawned detached, and what it started) */
function processesOfGroup(group: number): string[] {
  return spawnSync('pgrep', ['-g', String(group)], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean);
}

/** SIGKILL to each of these process groups that still has a process */
function killGroups(groups: readonly number[]): void {
  for (const group of groups) {
    try {
      process.kill(-group, 'SIGKILL');
    } catch {
      // none left
    }
  }
}

describe('scale-out of compress workers', { timeout: 300_000 }, () => {
  test('workers join and leave mid-migration: the work is shared, the images identical', async () => {
    const dest = await startDestination(ws, 'scaled');
    const joined: ActorProcess[] = [];
    let left: { pid: number | undefined; exit: Promise<number | null> } | undefined;
    try {
      const summary = await migrate(
        migrateOptions(ws, dest.address, {
          natsUrl: nats.url,
          compressWorkers: 1,
          // small chunks: enough of them to share
          chunkPages: 32,
          // slow compression keeps the compress queue busy long enough to join and leave
          mode: { delta: 'xor', compressor: 'zstd', level: 19 },
          onStarted: ({ stats, actors }) => {
            const timer = setInterval(() => {
              const compress = stats.stages.compress;
              if (!compress) return;
              if (joined.length === 0) {
                joined.push(spawnActor('compress', nats.url), spawnActor('compress', nats.url));
                return;
              }
              // once a newcomer has taken work, the first worker leaves
              if (!left && compress.instances >= 2) {
                const first = actors.find((a) => a.name === 'compress')!;
                left = { pid: first.child.pid, exit: exitOf(first) };
                first.child.kill('SIGTERM');
                clearInterval(timer);
              }
            }, 20);
          },
        }),
      );
      assert.equal(summary.verified, true, summary.reason);
      assert.equal(await hashImageFile(join(dest.outDir, 'memory.img')), await hashImageFile(ws.images.memory));
      assert.equal(await hashImageFile(join(dest.outDir, 'disk.img')), await hashImageFile(ws.images.disk));
      assert.ok(left, 'no worker left mid-migration');
      assert.equal(await left.exit, 0, 'the leaving worker did not exit cleanly');
      const perInstance = summary.stages.compress!.perInstance;
      process.stderr.write(`compress chunks per worker: ${JSON.stringify(perInstance)}\n`);
      assert.ok(Object.keys(perInstance).length >= 3, `work was not shared: ${JSON.stringify(perInstance)}`);
      for (const [instance, chunks] of Object.entries(perInstance)) assert.ok(chunks > 0, `${instance} did nothing`);
      assert.ok(Object.keys(perInstance).some((i) => i.endsWith(`:${left!.pid}`)), 'the worker that left did no work before leaving');
    } finally {
      await stopActors(joined);
      await dest.stop();
    }
  });

  test("the tuner's wish takes workers out of use, and they take work again when it ends", async () => {
    const dest = await startDestination(ws, 'wished');
    const bus = await connectBus(nats.url, 'test-wish');
    const kv = await workersBucket(bus);
    const workers = [spawnActor('compress', nats.url), spawnActor('compress', nats.url)];
    let refresh: NodeJS.Timeout | undefined;
    try {
      for (let i = 0; i < 100 && (await liveWorkers(kv, 'compress')).length < 2; i++) await new Promise((r) => setTimeout(r, 100));
      assert.equal((await liveWorkers(kv, 'compress')).length, 2, 'the workers never announced themselves');
      // one worker wanted (kept alive as the tuner does: the wish expires with its age)
      await setWantedWorkers(kv, 'compress', 1);
      refresh = setInterval(() => void setWantedWorkers(kv, 'compress', 1), 1000);
      await new Promise((r) => setTimeout(r, 1200));
      let duringWish: Record<string, number> | undefined;
      const summary = await migrate(
        migrateOptions(ws, dest.address, {
          natsUrl: nats.url,
          chunkPages: 32,
          mode: { delta: 'xor', compressor: 'zstd', level: 19 },
          onStarted: ({ stats }) => {
            const timer = setInterval(() => {
              const compress = stats.stages.compress;
              if (!compress || compress.chunks < 12) return;
              duringWish = { ...compress.perInstance };
              clearInterval(refresh);
              void setWantedWorkers(kv, 'compress', undefined);
              clearInterval(timer);
            }, 20);
          },
        }),
      );
      assert.equal(summary.verified, true, summary.reason);
      assert.equal(await hashImageFile(join(dest.outDir, 'memory.img')), await hashImageFile(ws.images.memory));
      const perInstance = summary.stages.compress!.perInstance;
      process.stderr.write(`compress chunks per worker, while one was wanted: ${JSON.stringify(duringWish)}; at the end: ${JSON.stringify(perInstance)}\n`);
      assert.ok(duringWish, 'the migration ended before the wish was lifted');
      assert.equal(Object.keys(duringWish).length, 1, `more than one worker in use while one was wanted: ${JSON.stringify(duringWish)}`);
      assert.ok(Object.keys(perInstance).length >= 2, `the other workers never took work again: ${JSON.stringify(perInstance)}`);
    } finally {
      clearInterval(refresh);
      await setWantedWorkers(kv, 'compress', undefined).catch(() => undefined);
      await stopActors(workers);
      await bus.close();
      await dest.stop();
    }
  });

  test("the presence view: keys written before and after it starts, a wish, a deleted key gone at once, a silent one after the bucket's age", async () => {
    const bus = await connectBus(nats.url, 'test-presence');
    const kv = await workersBucket(bus);
    const wait = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
    const until = async (what: string, ok: () => boolean): Promise<void> => {
      for (let i = 0; i < 100 && !ok(); i++) await wait(20);
      assert.ok(ok(), what);
    };
    await kv.put('viewtest.before', '1');
    const view = await PresenceView.start(kv);
    try {
      await until('a key written before the view began is not in it', () => view.live('viewtest').includes('viewtest.before'));
      await kv.put('viewtest.a', '1');
      await kv.put('viewtest.b', '1');
      await setWantedWorkers(kv, 'viewtest', 2);
      await until('keys written since are not in it', () => view.live('viewtest').length === 3 && view.wanted('viewtest') === 2);
      assert.deepEqual(view.live('viewtest'), ['viewtest.a', 'viewtest.b', 'viewtest.before'], 'not sorted, or another stage counted');
      await kv.delete('viewtest.a');
      await until('a deleted key is still live', () => !view.live('viewtest').includes('viewtest.a'));
      // b keeps beating, the others fall silent (a killed worker, a stopped tuner)
      const beat = setInterval(() => void kv.put('viewtest.b', '1'), 500);
      try {
        await wait(PRESENCE_TTL_MS + 300);
      } finally {
        clearInterval(beat);
      }
      assert.deepEqual(view.live('viewtest'), ['viewtest.b'], 'a silent key outlived the bucket\'s age');
      assert.equal(view.wanted('viewtest'), undefined, 'a wish not written again outlived its age');
    } finally {
      view.stop();
      await bus.close();
    }
  });

  test('descriptors, put before and after an actor follows the bucket, are handed over to prepare ahead; a deleted one ends', async () => {
    const bus = await connectBus(nats.url, 'test-descriptors');
    const descriptor = (migrationId: string): MigrationDescriptor => ({
      migrationId,
      createdAtMs: Date.now(),
      memory: { base: '/b/m', current: '/c/m', baseHash: 'h', bytes: 4096 },
      disk: { base: '/b/d', current: '/c/d', baseHash: 'h', bytes: 4096 },
      destination: '127.0.0.1:1',
      parts: 1,
      chunkPages: 16,
      bandwidthCapBps: 0,
      mode: { delta: 'patch', compressor: 'zstd', level: 3 },
    });
    const put: string[] = [];
    const ended: string[] = [];
    let cache: DescriptorCache | undefined;
    try {
      await bus.migrations.put('m-desc-before', JSON.stringify(descriptor('m-desc-before')));
      await bus.migrations.put('m-desc-malformed', JSON.stringify({ migrationId: 'm-desc-malformed' }));
      cache = await DescriptorCache.following(bus.migrations, (id) => ended.push(id), (d) => put.push(d.migrationId));
      await bus.migrations.put('m-desc-after', JSON.stringify(descriptor('m-desc-after')));
      const until = async (what: () => boolean): Promise<void> => {
        for (let i = 0; i < 100 && !what(); i++) await new Promise((r) => setTimeout(r, 50));
      };
      await until(() => put.includes('m-desc-after'));
      assert.ok(put.includes('m-desc-before') && put.includes('m-desc-after'), `handed over: ${put}`);
      assert.ok(!put.includes('m-desc-malformed'));
      assert.equal((await cache.get('m-desc-after')).mode.delta, 'patch');
      await bus.migrations.delete('m-desc-after');
      await until(() => ended.includes('m-desc-after'));
      assert.ok(ended.includes('m-desc-after'));
      // ended, not unknown: the stages drop its leftover chunks quietly
      await assert.rejects(cache.get('m-desc-after'), (err: unknown) => err instanceof EndedMigrationError && /m-desc-after has ended/.test(err.message));
      await assert.rejects(cache.get('m-never'), (err: unknown) => err instanceof UnknownMigrationError && !(err instanceof EndedMigrationError) && /unknown migration id m-never/.test(err.message));
    } finally {
      cache?.stop();
      for (const id of ['m-desc-before', 'm-desc-malformed']) await bus.migrations.delete(id).catch(() => undefined);
      await bus.close();
    }
  });

  test("a migration's first event of a kind: one published before the wait, one after, none by the deadline", async () => {
    const bus = await connectBus(nats.url, 'test-first-event');
    const decision = { atSeconds: 0, from: 'delta=none none', to: 'delta=xor zstd:3', bandwidthBps: 1e6, measuredBandwidthBps: 0, spareCores: 1, compressWorkers: 1, compressWorkersInUse: 1, overheadCpuMsPerBlock: 0, predictedCurrentBlocksPerSec: 1, predictedChosenBlocksPerSec: 2 };
    try {
      await publishEvent(bus, 'm-first-before', { type: 'tuned', decision });
      assert.equal((await firstEvent(bus, 'm-first-before', 'tuned', 5000))?.decision.to, 'delta=xor zstd:3', 'an event from before the wait was missed');
      const later = firstEvent(bus, 'm-first-after', 'tuned', 10_000);
      await new Promise((r) => setTimeout(r, 200));
      await publishEvent(bus, 'm-first-after', { type: 'start' }); // another kind: no answer
      await publishEvent(bus, 'm-first-after', { type: 'tuned', decision: { ...decision, to: 'delta=zstd none' } });
      assert.equal((await later)?.decision.to, 'delta=zstd none');
      // nobody answers (no tuner runs): undefined at the deadline, not a wait for ever
      const started = performance.now();
      assert.equal(await firstEvent(bus, 'm-first-never', 'tuned', 300), undefined);
      assert.ok(performance.now() - started >= 300);
    } finally {
      await bus.close();
    }
  });

  test("a migration's first event, published on core NATS: the waiter has it from its subject, without the stream", async () => {
    // a nats-server of its own, whose events stream is gone: only the core path can answer
    const own = await startEmbeddedNats();
    const bus = await connectBus(own.url, 'test-first-event-core');
    const decision = { atSeconds: 0, from: 'delta=none none', to: 'delta=patch zstd:9', bandwidthBps: 1e6, measuredBandwidthBps: 0, spareCores: 1, compressWorkers: 1, compressWorkersInUse: 1, overheadCpuMsPerBlock: 0, predictedCurrentBlocksPerSec: 1, predictedChosenBlocksPerSec: 2 };
    try {
      await bus.jsm.streams.delete(STREAMS.events);
      const waiting = firstEvent(bus, 'm-first-core', 'tuned', 5000);
      await new Promise((r) => setTimeout(r, 200));
      bus.nc.publish(eventSubject('m-first-core', 'start'), encodeEvent({ type: 'start' })); // another kind: no answer
      bus.nc.publish(eventSubject('m-first-core', 'tuned'), encodeEvent({ type: 'tuned', decision }));
      assert.equal((await waiting)?.decision.to, 'delta=patch zstd:9', 'the event on its subject was missed');
      // and with nothing published, the stream's failure is what the deadline gives, not a silent undefined
      await assert.rejects(firstEvent(bus, 'm-first-core-none', 'tuned', 300), /stream/i);
    } finally {
      await bus.close();
      await own.stop();
    }
  });

  /** captures the test images for an adaptive migration through `gate`, with `check` run while it does */
  const gatedCapture = async (migrationId: string, gate: (looked: Promise<void>) => CaptureGate, check: (queued: () => Promise<number>, open: () => void) => Promise<void>): Promise<void> => {
    const bus = await connectBus(nats.url, `test-${migrationId}`);
    const subject = workSubject('dedup', migrationId, 0);
    const pair = async (base: string, current: string) => ({ base, current, baseHash: (await loadBaseIndex(base)).contentHash, bytes: (await stat(current)).size });
    const d: MigrationDescriptor = {
      migrationId,
      createdAtMs: Date.now(),
      memory: await pair(ws.images.baseMemory, ws.images.memory),
      disk: await pair(ws.images.baseDisk, ws.images.disk),
      destination: '127.0.0.1:1',
      parts: 1,
      chunkPages: 16,
      bandwidthCapBps: 0,
      mode: ADAPTIVE_START_MODE,
      adaptive: true,
    };
    const queued = async (): Promise<number> => (await bus.jsm.streams.info(STREAMS.dedup, { subjects_filter: subject })).state.subjects?.[subject] ?? 0;
    let open: () => void = () => undefined;
    const looked = new Promise<void>((resolve) => (open = resolve));
    // nothing consumes here: the migration's backlog budget would hold capture, not the gate
    const budget = process.env.HANDOFF_MIGRATION_BACKLOG;
    process.env.HANDOFF_MIGRATION_BACKLOG = String(Number.MAX_SAFE_INTEGER);
    try {
      const round = captureRound(bus, d, 0, createLogger({ stage: 'capture' }), undefined, gate(looked));
      await check(queued, open);
      const r = await round;
      assert.ok(r.slices > 4 * HEAD_START_CHUNKS, `${r.slices} chunks: too few to tell`);
      assert.equal(await queued(), r.slices, 'chunks queued after the look');
    } finally {
      if (budget === undefined) delete process.env.HANDOFF_MIGRATION_BACKLOG;
      else process.env.HANDOFF_MIGRATION_BACKLOG = budget;
      await bus.jsm.streams.purge(STREAMS.dedup, { filter: subject }).catch(() => undefined);
      await bus.close();
    }
  };

  test("capture holds an adaptive migration's chunks past its head start until the tuner's look, then sends the rest", async () => {
    await gatedCapture('m-head-start', (open) => ({ afterChunks: HEAD_START_CHUNKS, open }), async (queued, open) => {
      await new Promise((r) => setTimeout(r, 1500));
      assert.equal(await queued(), HEAD_START_CHUNKS, 'chunks queued before the look');
      open();
    });
  });

  test('the head start itself waits for a look that comes soon, then goes with the rest', async () => {
    await gatedCapture('m-head-start-wait', (open) => ({ afterChunks: HEAD_START_CHUNKS, open, headStartWaitMs: 60_000 }), async (queued, open) => {
      await new Promise((r) => setTimeout(r, 1500));
      assert.equal(await queued(), 0, 'the head start went before the look, within its wait');
      open();
    });
  });

  test('an actor answers health, readiness and metrics, and leaves cleanly on SIGTERM', async () => {
    const port = await freePort();
    process.env.HANDOFF_HEALTH_PORT = String(port);
    const worker = spawnActor('compress', nats.url);
    delete process.env.HANDOFF_HEALTH_PORT;
    try {
      const base = `http://127.0.0.1:${port}`;
      let ready = 0;
      for (let i = 0; i < 100 && ready !== 200; i++) {
        ready = await fetch(`${base}/readyz`).then(
          (r) => r.status,
          () => 0,
        );
        if (ready !== 200) await new Promise((r) => setTimeout(r, 100));
      }
      assert.equal(ready, 200, 'never ready');
      // and the command that spawned it was told so (a migration starts once its actors are)
      await worker.ready;
      assert.equal((await fetch(`${base}/healthz`)).status, 200);
      const metrics = await (await fetch(`${base}/metrics`)).text();
      assert.match(metrics, /handoff_queue_depth\{stage="compress"[^}]*\} \d+/);
      assert.match(metrics, /service_name="handoff-compress"/);
      worker.child.kill('SIGTERM');
      assert.equal(await exitOf(worker), 0);
    } finally {
      await stopActors([worker]);
    }
  });

  test('an actor that cannot start says so to the command that spawned it, by name', async () => {
    const broken = spawnActor('delta', 'nats://127.0.0.1:1', { partition: 3 });
    try {
      await assert.rejects(broken.ready, /actor delta-3 exited \(code 1\) before it was ready/);
    } finally {
      await stopActors([broken]);
    }
  });

  test('the actors of a command killed outright (SIGKILL) stop on their own', async () => {
    // a command that spawns one actor, says its pid once the actor takes work, and is then killed
    const actorsModule = new URL('../cli/actors.js', import.meta.url).href;
    const script = `const { spawnActor } = await import(${JSON.stringify(actorsModule)});
      const a = spawnActor('compress', ${JSON.stringify(nats.url)});
      await a.ready;
      console.log(a.child.pid);
      setInterval(() => undefined, 1000);`;
    const command = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    let actorPid = 0;
    try {
      actorPid = await new Promise<number>((resolve, reject) => {
        let out = '';
        command.stdout!.on('data', (d: Buffer) => {
          out += d.toString();
          if (out.includes('\n')) resolve(Number(out.trim()));
        });
        command.once('exit', (code) => reject(new Error(`the command exited (${code}) before its actor was ready`)));
      });
      assert.ok(actorPid > 0);
      command.kill('SIGKILL');
      // a zombie (ended, not yet reaped where PID 1 does not reap) counts as gone
      const alive = (): boolean => {
        const state = readProcStat(actorPid)?.state;
        return state !== undefined && state !== 'Z';
      };
      // it finishes in-flight work and leaves; reaped by init, not by us
      for (let i = 0; i < 100 && alive(); i++) await new Promise((r) => setTimeout(r, 100));
      assert.equal(alive(), false, 'the actor ran on after its command was killed');
    } finally {
      command.kill('SIGKILL');
      if (actorPid > 0) {
        try {
          process.kill(actorPid, 'SIGKILL');
        } catch {
          // gone, as it should be
        }
      }
    }
  });

  /**
   * A `migrate` command in a process group of its own (to count what it started) on a slow link,
   * once the destination accepted: the command, its actors and its nats-server run.
   */
  const handoffMidWay = async (outDir: string, stdout: 'pipe' | 'ignore'): Promise<{ receiver: Awaited<ReturnType<typeof spawnReceiverProcess>>; command: ChildProcess; group: number; left: () => string[] }> => {
    const receiver = await spawnReceiverProcess({ baseMemory: ws.destBaseMemory, baseDisk: ws.destBaseDisk, outDir: join(ws.dir, outDir), ownProcessGroup: true, env: { HANDOFF_LOG_LEVEL: 'info' } });
    const i = ws.images;
    const main = new URL('../cli/main.js', import.meta.url).pathname;
    const command = spawn(process.execPath, [main, 'migrate', '--base-memory', i.baseMemory, '--memory', i.memory, '--base-disk', i.baseDisk, '--disk', i.disk, '--to', receiver.address, '--bandwidth', '20mbit', '--json', '--no-progress'], {
      stdio: ['ignore', stdout, 'ignore'],
      detached: true,
    });
    const group = command.pid!;
    const left = (): string[] => processesOfGroup(group);
    try {
      await receiver.waitForLog(/ accepted /);
      await new Promise((r) => setTimeout(r, 300));
      assert.ok(left().length >= 7, `the command, its actors and nats-server run: ${left().length} processes`);
    } catch (err) {
      killGroups([group, receiver.child.pid!]);
      throw err;
    }
    return { receiver, command, group, left };
  };

  test("a handoff command's process group stopped mid-handoff, its nats-server with it, leaves no process behind", async () => {
    const { receiver, group, left } = await handoffMidWay('stopped-group', 'ignore');
    try {
      process.kill(-group, 'SIGTERM');
      // the actors' in-flight work cannot finish without the bus: each exits at its deadline (15 s) at the latest
      for (let t = 0; t < 250 && left().length > 0; t++) await new Promise((r) => setTimeout(r, 100));
      assert.deepEqual(left(), [], 'processes of the stopped handoff ran on');
    } finally {
      killGroups([group, receiver.child.pid!]);
    }
  });

  test('a handoff command stopped alone (SIGTERM) mid-handoff stops its actors and nats-server, and says so in its summary', async () => {
    const { receiver, command, group, left } = await handoffMidWay('stopped-command', 'pipe');
    let out = '';
    command.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((resolve) => command.once('exit', (code) => resolve(code)));
    try {
      process.kill(group, 'SIGTERM');
      const code = await Promise.race([exited, new Promise<'running'>((r) => setTimeout(() => r('running'), 30_000))]);
      assert.equal(code, 1, 'the stopped command exits 1 (not verified), having written its summary');
      const summary = JSON.parse(out) as MigrationSummary;
      assert.equal(summary.verified, false);
      assert.match(summary.reason ?? '', /stopped \(by a signal\)/);
      for (let t = 0; t < 50 && left().length > 0; t++) await new Promise((r) => setTimeout(r, 100));
      assert.deepEqual(left(), [], 'actors or the nats-server of the stopped command ran on');
    } finally {
      killGroups([group, receiver.child.pid!]);
    }
  });

  test('a compress worker on another host joins through a leaf-node nats-server and takes work', { skip: process.getuid?.() === 0 ? false : 'needs root for network namespaces' }, async () => {
    const hosts = await startTwoHosts(`ts${process.pid % 10000}`);
    const saved = process.env.HANDOFF_JS_DOMAIN;
    const actors: ActorProcess[] = [];
    let receiver: Awaited<ReturnType<typeof spawnReceiverProcess>> | undefined;
    try {
      const outDir = join(ws.dir, 'destination', 'second-host');
      receiver = await spawnReceiverProcess({ baseMemory: ws.destBaseMemory, baseDisk: ws.destBaseDisk, outDir, listen: '127.0.0.1:7301', prefix: hosts.host1 });
      process.env.HANDOFF_JS_DOMAIN = JS_DOMAIN;
      const { host1, host2, hub, leaf } = hosts;
      actors.push(
        spawnActor('capture', hub.url, { prefix: host1 }),
        spawnActor('dedup', hub.url, { partition: 0, prefix: host1 }),
        spawnActor('delta', hub.url, { prefix: host1 }),
        spawnActor('sender', hub.url, { prefix: host1 }),
        // the only compress worker runs on host 2
        spawnActor('compress', leaf.url, { prefix: host2 }),
      );
      const i = ws.images;
      const summary = await migrateOn(host1, ['--external-actors', '--nats', hub.url, '--base-memory', i.baseMemory, '--memory', i.memory, '--base-disk', i.baseDisk, '--disk', i.disk, '--to', '127.0.0.1:7301', '--mode', 'zstd:3']);
      assert.equal(summary.verified, true, summary.reason);
      // host 2's worker, the only one, did all the compression
      const perInstance = summary.stages.compress!.perInstance;
      assert.equal(Object.keys(perInstance).length, 1);
      assert.ok(Object.values(perInstance)[0]! > 0);
      await receiver.exited;
      assert.equal(await hashImageFile(join(outDir, 'memory.img')), await hashImageFile(i.memory));
      assert.equal(await hashImageFile(join(outDir, 'disk.img')), await hashImageFile(i.disk));
    } finally {
      if (saved === undefined) delete process.env.HANDOFF_JS_DOMAIN;
      else process.env.HANDOFF_JS_DOMAIN = saved;
      await stopActors(actors);
      if (receiver) await stopProcess(receiver.child, 5000);
      await hosts.destroy();
    }
  });
});
