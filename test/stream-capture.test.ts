/**
 * Stream capture, the source half alone, on a real QEMU started as a user starts one (ordinary
 * RAM, default devices, a NIC, a raw disk) with a base taken by takeBase, against a local
 * nats-server: round 0 publishes chunks of only the pages that differ from the base, rounds end
 * where a page comes again, QEMU stops the VM and the final `captured` event carries the device
 * state. And a VM whose RAM blocks are not the base's is refused before any chunk is published,
 * the guest running on. A consumer stands in for dedup, acking every chunk (so that a round's
 * delivery is awaited as in a handoff).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, open, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { prepareStreamHandoff } from '../cli/migrate.js';
import { GUEST_CACHE } from '../load/lib/vm.js';
import { captureStream, type StreamLiveVm } from '../services/capture/stream.js';
import type { StreamRoundRecord } from '../services/capture/stream-core.js';
import { connectBus, ensureWorkConsumer, type Bus } from '../shared/bus/bus.js';
import { startEmbeddedNats, type EmbeddedNats } from '../shared/bus/nats-server.js';
import { STREAMS, eventSubject } from '../shared/bus/subjects.js';
import { decodePatch } from '../shared/codecs/patch.js';
import { loadBaseIndex } from '../shared/image/base-index.js';
import { PAGE_SIZE, STRONG_HASH_BYTES, strongHash } from '../shared/image/pages.js';
import { parseEvent, type MigrationDescriptor, type MigrationEvent } from '../shared/model/migration.js';
import { createLogger } from '../shared/telemetry/log.js';
import { readBase, type BaseFolder } from '../shared/vm/base-manifest.js';
import { takeBase } from '../shared/vm/base-snapshot.js';
import { parseMigrationStream, type MigrationRecord } from '../shared/vm/migration-stream.js';
import { QEMU_BIN } from '../shared/vm/qemu.js';
import { buildGuest } from '../shared/testdata/guest.js';
import { decodeChunk } from '../shared/wire/chunk-codec.js';
import type { Chunk } from '../shared/model/chunk.js';
import { startUserVm, userVmArgv, waitFor, type UserVm } from './helpers/user-vm.js';

const hasQemu = spawnSync(QEMU_BIN, ['--version']).status === 0;
const DISK_BYTES = 64 << 20;
const log = createLogger({ stage: 'capture', test: 'stream-capture' });

type Captured = Extract<MigrationEvent, { type: 'captured' }>;

/** What reached "dedup" and the events of one migration. */
interface Observed {
  chunks: Chunk[];
  captured: Captured[];
  stop(): Promise<void>;
}

async function observe(bus: Bus, migrationId: string, ackDelayMs: number): Promise<Observed> {
  const chunks: Chunk[] = [];
  const captured: Captured[] = [];
  const events = bus.nc.subscribe(eventSubject(migrationId, 'captured'), {
    callback: (err, m) => {
      if (!err) captured.push(parseEvent(m.data) as Captured);
    },
  });
  const durable = await ensureWorkConsumer(bus, 'dedup', 0, 30_000);
  const messages = await (await bus.js.consumers.get(STREAMS.dedup, durable)).consume();
  const done = (async () => {
    for await (const m of messages) {
      chunks.push(decodeChunk(m.data));
      // a pipeline takes its time: the round's delivery is awaited by capture
      if (ackDelayMs) await new Promise((r) => setTimeout(r, ackDelayMs));
      m.ack();
    }
  })();
  return {
    chunks,
    captured,
    stop: async () => {
      await messages.close();
      await done;
      events.unsubscribe();
    },
  };
}

function descriptorFor(migrationId: string, base: BaseFolder, disk: string, diskHash: string, live: StreamLiveVm): MigrationDescriptor {
  return {
    migrationId,
    createdAtMs: Date.now(),
    memory: { base: base.memoryPath, current: '', baseHash: base.manifest.memory.contentHash, bytes: base.manifest.memory.bytes },
    disk: { base: base.diskPaths[0]!, current: disk, baseHash: diskHash, bytes: DISK_BYTES },
    destination: '127.0.0.1:1',
    parts: 1,
    chunkPages: 64,
    bandwidthCapBps: 0,
    mode: { delta: 'none', compressor: 'none', level: 0 },
    live,
  };
}

async function vmStatus(vm: UserVm): Promise<string> {
  const qmp = await vm.connect();
  try {
    return (await qmp.execute('query-status')).status;
  } finally {
    vm.disconnect();
  }
}

describe('stream capture from a real QEMU', { timeout: 600_000, skip: hasQemu ? false : 'needs qemu-system-x86_64' }, () => {
  let dir: string;
  let nats: EmbeddedNats | undefined;
  let bus: Bus | undefined;
  let vm: UserVm | undefined;
  let base: BaseFolder;
  let disk: string;
  let live: StreamLiveVm;
  let diskHash: string;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stream-capture-'));
    const guest = buildGuest(GUEST_CACHE);
    const paths = { qmp: join(dir, 'vm.qmp'), serial: join(dir, 'serial.log'), disk: join(dir, 'disk.raw') };
    disk = paths.disk;
    const fh = await open(disk, 'w');
    await fh.truncate(DISK_BYTES);
    await fh.write(Buffer.alloc(1 << 20, 0x5a), 0, 1 << 20, 0);
    await fh.close();
    vm = await startUserVm(userVmArgv(guest, paths), paths);
    await vm.waitCounter(3, 180_000);
    vm.disconnect();
    const taken = await takeBase({ qmpSocket: paths.qmp, outDir: join(dir, 'base') });
    process.stderr.write(`base taken in ${taken.seconds.toFixed(2)} s, guest paused ${taken.pausedMs} ms, blocks ${taken.ramBlocks.map((b) => `${b.idstr}=${b.bytes}`).join(' ')}\n`);
    base = await readBase(join(dir, 'base'));
    // the disk's base index, built once (the receiver's side would do the same)
    const diskIndex = await loadBaseIndex(base.diskPaths[0]!);
    live = {
      qmpSocket: paths.qmp,
      baseDeviceState: base.deviceStatePath,
      downtimeMs: 5,
      maxRounds: 6,
      machine: { argv: vm.argv, ramBlocks: base.manifest.ramBlocks },
    };
    diskHash = diskIndex.contentHash;
    nats = await startEmbeddedNats();
    bus = await connectBus(nats.url, 'stream-capture-test');
  });

  after(async () => {
    await bus?.close();
    await nats?.stop();
    await vm?.kill();
    await rm(dir, { recursive: true, force: true });
  });

  test('migrate checks the VM against its base before any page moves: its own base passes, another machine is refused naming the difference', async () => {
    const ok = await prepareStreamHandoff({ qmpSocket: live.qmpSocket, baseDir: base.dir, downtimeMs: 300, maxRounds: 30, autoConverge: true });
    assert.equal(ok.disk, disk);
    assert.equal(ok.baseDisk, base.diskPaths[0]);
    assert.deepEqual(ok.live.machine.argv, vm!.argv);
    assert.deepEqual(ok.live.machine.ramBlocks, base.manifest.ramBlocks);
    // a base of another machine (more memory, no NIC): its files linked, its manifest changed
    const other = join(dir, 'base-other');
    await mkdir(other);
    for (const f of await readdir(base.dir)) if (f !== 'base.json') await symlink(join(base.dir, f), join(other, f));
    const manifest = { ...base.manifest, machine: { ...base.manifest.machine, memoryBytes: 512 << 20, devices: [] } };
    await writeFile(join(other, 'base.json'), JSON.stringify(manifest));
    await assert.rejects(
      prepareStreamHandoff({ qmpSocket: live.qmpSocket, baseDir: other, downtimeMs: 300, maxRounds: 30, autoConverge: true }),
      (err: Error) => {
        process.stderr.write(`refused: ${err.message}\n`);
        assert.match(err.message, /is not the machine of the base/);
        assert.match(err.message, /memory: the VM 256 MiB, the base 512 MiB/);
        assert.match(err.message, /device virtio-net-pci missing at the base/);
        return true;
      },
    );
    assert.equal(await vmStatus(vm!), 'running');
  });

  test("a VM whose RAM blocks are not the base's is refused before any chunk is published; the guest runs on", async () => {
    const migrationId = 'm-stream-refused';
    const wrong: StreamLiveVm = {
      ...live,
      machine: { argv: live.machine.argv, ramBlocks: live.machine.ramBlocks.map((b) => (b.idstr === 'pc.ram' ? { ...b, bytes: b.bytes * 2 } : b)) },
    };
    const d = descriptorFor(migrationId, base, disk, diskHash, wrong);
    const events = bus!.nc.subscribe(eventSubject(migrationId, 'captured'));
    const counterBefore = vm!.counter();
    const started = performance.now();
    const error = await captureStream(bus!, d, log, undefined, () => undefined).then(
      () => undefined,
      (err: unknown) => err as Error,
    );
    process.stderr.write(`refused in ${Math.round(performance.now() - started)} ms: ${error?.message}\n`);
    assert.ok(error, 'capture did not refuse');
    assert.match(error.message, /the VM's RAM is not the base's: RAM block "pc\.ram": 256\.0+ MiB in the VM, 512\.0+ MiB in the base/);
    assert.match(error.message, /the source VM runs on/);
    await new Promise((r) => setTimeout(r, 500));
    events.unsubscribe();
    assert.equal((await bus!.jsm.streams.info(STREAMS.dedup)).state.messages, 0, 'chunks were published');
    assert.equal(events.getReceived(), 0, 'a round was announced');
    assert.equal(await vmStatus(vm!), 'running');
    await vm!.waitCounter(counterBefore + 2, 30_000);
  });

  test('round 0 sends only pages that differ from the base; rounds end on repeats; QEMU stops the VM; the final event has the device state', async () => {
    const migrationId = 'm-stream-capture';
    const d = descriptorFor(migrationId, base, disk, diskHash, live);
    await bus!.migrations.put(migrationId, JSON.stringify(d));
    const observed = await observe(bus!, migrationId, 2);
    // the guest dirties memory beyond its base for a while
    await vm!.waitCounter(vm!.counter() + 8, 60_000);
    const started = performance.now();
    await captureStream(bus!, d, log, undefined, () => undefined);
    const seconds = (performance.now() - started) / 1000;
    await waitFor('the final captured event did not arrive', 10_000, () => (observed.captured.some((c) => c.final) ? true : undefined));
    await new Promise((r) => setTimeout(r, 300));
    await observed.stop();

    const rounds = observed.captured;
    const final = rounds.at(-1)!;
    assert.equal(final.final, true);
    assert.ok(rounds.slice(0, -1).every((c) => c.final === false));
    const records = final.rounds as StreamRoundRecord[];
    const pagesOf = (round: number, image: number): number => observed.chunks.filter((c) => c.round === round && c.image === image).reduce((a, c) => a + c.pageIndex.length, 0);
    const bytesOf = (round: number): number => observed.chunks.filter((c) => c.round === round).reduce((a, c) => a + c.body.byteLength, 0);
    process.stderr.write(
      `stream capture: ${seconds.toFixed(2)} s, ${rounds.length} rounds, QEMU downtime ${records.at(-1)?.qemuDowntimeMs} ms, ` +
        `throttle up to ${Math.max(0, ...records.map((r) => r.cpuThrottlePct ?? 0))}%\n` +
        records.map((r) => `  round ${r.round}: ${pagesOf(r.round, 0)} memory pages + ${pagesOf(r.round, 1)} disk pages, ${bytesOf(r.round)} bytes in ${observed.chunks.filter((c) => c.round === r.round).length} chunks, ${r.seconds} s; ${r.decision}${r.cpuThrottlePct ? ` (throttle ${r.cpuThrottlePct}%)` : ''}`).join('\n') +
        '\n',
    );

    // every round announced its slices, and they all arrived
    for (const c of rounds) assert.equal(observed.chunks.filter((k) => k.round === c.round).length, c.slices, `round ${c.round}: slices`);
    // round 0: only pages that differ from the base's, and each page once
    const baseIndex = await loadBaseIndex(base.memoryPath);
    const round0 = observed.chunks.filter((c) => c.round === 0 && c.image === 0);
    const seen = new Set<number>();
    for (const c of round0) {
      for (let i = 0; i < c.pageIndex.length; i++) {
        const index = c.pageIndex[i]!;
        const page = c.body.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
        assert.ok(!seen.has(index), `page ${index} twice in round 0`);
        seen.add(index);
        const at = index * STRONG_HASH_BYTES;
        assert.notDeepEqual(strongHash(page), Buffer.from(baseIndex.hashes.subarray(at, at + STRONG_HASH_BYTES)), `round 0 sent page ${index}, which equals the base's`);
      }
    }
    assert.ok(seen.size > 0 && seen.size < baseIndex.pages / 4, `round 0 sent ${seen.size} of ${baseIndex.pages} pages`);
    // no page twice in any round
    for (const c of rounds) {
      const indices = observed.chunks.filter((k) => k.round === c.round && k.image === 0).flatMap((k) => [...k.pageIndex]);
      assert.equal(new Set(indices).size, indices.length, `round ${c.round} holds a page twice`);
    }
    // QEMU's passes end rounds: a page came again before QEMU stopped the VM
    assert.ok(rounds.length >= 2);
    assert.ok(records.some((r) => /a page came again/.test(r.decision)), `no round ended on a repeated page: ${records.map((r) => r.decision).join(' | ')}`);
    // QEMU stopped the VM: the source is stopped, its STOP time is the event's, and QEMU's downtime is known
    assert.ok(final.stoppedAtMs !== undefined && final.stoppedAtMs > Date.now() - 600_000);
    assert.ok(records.at(-1)!.qemuDowntimeMs !== undefined);
    assert.equal(await vmStatus(vm!), 'postmigrate');
    // the device state is the stream without its RAM: header, configuration, device sections, EOF
    assert.ok(final.deviceState);
    const state = decodePatch(Buffer.from(final.deviceState, 'base64'), await readFile(base.deviceStatePath));
    const kinds: MigrationRecord['kind'][] = [];
    for await (const r of parseMigrationStream((async function* () { yield state; })())) kinds.push(r.kind);
    assert.equal(kinds[0], 'header');
    assert.equal(kinds[1], 'configuration');
    assert.ok(kinds.includes('device-section'));
    assert.ok(kinds.includes('eof'));
    assert.ok(!kinds.some((k) => k.startsWith('ram-')), 'the device state holds RAM');
  });

  test('a guest dirtying faster than the pipeline takes its pages: auto-converge throttles it, the rounds say how far', async () => {
    // the previous test handed the guest off: it runs again here
    const qmp = await vm!.connect();
    await qmp.execute('cont');
    vm!.disconnect();
    await vm!.waitCounter(vm!.counter() + 4, 60_000);
    const migrationId = 'm-stream-throttled';
    const d = descriptorFor(migrationId, base, disk, diskHash, { ...live, maxRounds: 12 });
    await bus!.migrations.put(migrationId, JSON.stringify(d));
    // "dedup" takes 0.4 s per chunk of 64 pages: about 0.6 MiB/s, less than the guest dirties
    const observed = await observe(bus!, migrationId, 400);
    const started = performance.now();
    await captureStream(bus!, d, log, undefined, () => undefined);
    const seconds = (performance.now() - started) / 1000;
    await waitFor('the final captured event did not arrive', 10_000, () => (observed.captured.some((c) => c.final) ? true : undefined));
    await observed.stop();
    const records = observed.captured.at(-1)!.rounds as StreamRoundRecord[];
    const throttle = Math.max(0, ...records.map((r) => r.cpuThrottlePct ?? 0));
    process.stderr.write(
      `throttled stream capture: ${seconds.toFixed(2)} s, ${records.length} rounds, QEMU downtime ${records.at(-1)?.qemuDowntimeMs} ms, throttle up to ${throttle}%\n` +
        records.map((r) => `  round ${r.round}: ${r.dirtyPages} pages, ${r.seconds} s; ${r.decision}${r.cpuThrottlePct ? ` (throttle ${r.cpuThrottlePct}%)` : ''}`).join('\n') +
        '\n',
    );
    assert.equal(observed.captured.at(-1)!.final, true);
    assert.ok(throttle > 0, 'QEMU did not throttle the guest');
  });
});
