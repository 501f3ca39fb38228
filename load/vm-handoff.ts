/**
 * The same running guest handed off by this system and by QEMU's own live migration (plain
 * pre-copy, and multifd with zstd), over the same 10 Mbit/s shaped link between two network
 * namespaces: total time, downtime, bytes on the wire, side by side. Root needed.
 *
 *   npm run load:vm-handoff -- [--rate-mbit 10] [--guest-files 1] [--only handoff,qemu-plain,...] [--json]
 *
 * --guest-files: tmpfs files the guest's 512 KiB/s of writes rotate over. 1 (default): a working
 * set of about a MiB; 128 makes it 16 MiB.
 *
 * The handoff runs as deployed: the source cloudlet's nats-server and actors already run, its base
 * VM is indexed. QEMU migrates RAM only here (its disk is assumed shared); the handoff moves RAM and disk. Wire
 * bytes are tc's counter on the source's end of the link (headers included), the same for all. A
 * QEMU pre-copy that has not converged after 300 s is cancelled and reported as such (`null` total
 * in --json).
 */
import { copyFileSync, mkdirSync, truncateSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { formatTable } from '../cli/summary.js';
import { stopProcess } from '../shared/actor/child.js';
import { spawnActor, stopActors } from '../cli/actors.js';
import { startEmbeddedNats } from '../shared/bus/nats-server.js';
import { startQemu } from '../shared/vm/qemu.js';
import { QmpClient } from '../shared/vm/qmp.js';
import { migrateOn } from './lib/hosts.js';
import { qemuLiveMigration } from './lib/qemu-live.js';
import { liveMigrateArgs, spawnVmDestination, startTestVm } from './lib/vm.js';
import { createShapedLink } from './lib/wan.js';

const { values } = parseArgs({ options: { 'rate-mbit': { type: 'string' }, 'guest-files': { type: 'string' }, only: { type: 'string' }, json: { type: 'boolean' } } });
const rateMbit = Number(values['rate-mbit'] ?? 10);
const workingSetFiles = Number(values['guest-files'] ?? 1);
if (!(rateMbit > 0) || !Number.isInteger(workingSetFiles) || workingSetFiles < 1) {
  console.error('--rate-mbit must be > 0 and --guest-files a whole number >= 1');
  process.exit(2);
}

interface Row {
  system: 'handoff' | 'qemu-plain' | 'qemu-multifd-zstd';
  totalSeconds: number;
  downtimeMs: number;
  wireBytes: number;
}

if (process.getuid?.() !== 0) {
  console.error('load:vm-handoff needs root: it makes two network namespaces joined by a shaped link');
  process.exit(2);
}

const dir = await mkdtemp(join(tmpdir(), 'handoff-vm-bench-'));
const link = createShapedLink(rateMbit * 1e6, `vb${process.pid % 10000}`);
const destNs = ['ip', 'netns', 'exec', link.destNs];
const srcNs = ['ip', 'netns', 'exec', link.sourceNs];
const rows: Row[] = [];
const say = (text: string): void => void (values.json || process.stderr.write(`${text}\n`));

/** QEMU's pre-copy is given this long to converge */
const CONVERGE_LIMIT_S = 300;

/** Lets the guest run a while after its base snapshot: what a user's session changes. */
const SESSION_TICKS = 20;

async function handoffRun(): Promise<Row> {
  const vm = await startTestVm(join(dir, 'handoff-src'), { prefix: srcNs, workingSetFiles });
  const receiver = await spawnVmDestination(vm, join(dir, 'handoff-dst'), `${link.destIp}:7300`, destNs);
  // the source cloudlet as deployed: its nats-server and actors already run
  const nats = await startEmbeddedNats({ prefix: srcNs });
  const actors = (['capture', 'dedup', 'delta', 'compress', 'compress', 'sender'] as const).map((name) => spawnActor(name, nats.url, { prefix: srcNs }));
  try {
    await vm.vm.waitCounter(vm.vm.counter() + SESSION_TICKS);
    const sentBefore = link.sentBytes();
    const s = await migrateOn(srcNs, ['--external-actors', '--nats', nats.url, ...liveMigrateArgs(vm, receiver.address)]);
    const wireBytes = link.sentBytes() - sentBefore;
    if (!s.verified) throw new Error(`handoff failed: ${s.reason}`);
    const { result } = await receiver.exited;
    if (result?.vm?.pid) process.kill(result.vm.pid, 'SIGKILL');
    say(`handoff: ${s.handoffSeconds.toFixed(1)} s, downtime ${s.downtimeMs} ms, rounds ${s.rounds?.map((r) => r.dirtyPages).join('/')}`);
    return { system: 'handoff', totalSeconds: s.handoffSeconds, downtimeMs: s.downtimeMs ?? NaN, wireBytes };
  } finally {
    await stopActors(actors);
    await nats.stop();
    await stopProcess(receiver.child, 5000);
    await vm.vm.kill();
  }
}

/** QEMU's own live migration of the same guest to a QEMU in the destination namespace. */
async function qemuRun(system: 'qemu-plain' | 'qemu-multifd-zstd'): Promise<Row> {
  // QEMU sends from the source host: through the shaped link
  const vm = await startTestVm(join(dir, `${system}-src`), { prefix: srcNs, workingSetFiles });
  const dst = join(dir, `${system}-dst`);
  const paths = { ...vm.paths, memoryFile: join(dst, 'memory.ram'), disk: join(dst, 'disk.img'), qmpSocket: join(dst, 'qmp.sock'), serialLog: join(dst, 'serial.log') };
  mkdirSync(dst, { recursive: true });
  writeFileSync(paths.memoryFile, '');
  truncateSync(paths.memoryFile, vm.description.memoryBytes);
  copyFileSync(vm.paths.disk, paths.disk);
  const target = await startQemu(vm.description, paths, { incoming: true, prefix: destNs });
  const source = await QmpClient.connect(vm.paths.qmpSocket);
  try {
    await vm.vm.waitCounter(vm.vm.counter() + SESSION_TICKS);
    // QEMU moves the RAM itself here (the base snapshot left x-ignore-shared on at the source)
    for (const qmp of [source, target.qmp]) await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: false }] });
    const run = await qemuLiveMigration(source, target.qmp, `tcp:${link.destIp}:7400`, { multifd: system === 'qemu-multifd-zstd', limitSeconds: CONVERGE_LIMIT_S, sentBytes: link.sentBytes });
    if (!run.converged) {
      say(`${system}: no convergence within ${CONVERGE_LIMIT_S} s`);
      return { system, totalSeconds: Infinity, downtimeMs: NaN, wireBytes: run.wireBytes };
    }
    const row: Row = { system, totalSeconds: run.totalSeconds!, downtimeMs: run.downtimeMs ?? NaN, wireBytes: run.wireBytes };
    say(`${system}: ${row.totalSeconds.toFixed(1)} s, downtime ${row.downtimeMs} ms`);
    return row;
  } finally {
    source.close();
    await target.kill();
    await vm.vm.kill();
  }
}

const systems = (values.only ?? 'handoff,qemu-plain,qemu-multifd-zstd').split(',');
try {
  if (systems.includes('handoff')) rows.push(await handoffRun());
  if (systems.includes('qemu-plain')) rows.push(await qemuRun('qemu-plain'));
  if (systems.includes('qemu-multifd-zstd')) rows.push(await qemuRun('qemu-multifd-zstd'));
} finally {
  link.destroy();
  await rm(dir, { recursive: true, force: true });
}

if (values.json) {
  console.log(JSON.stringify(Object.fromEntries(rows.map((r) => [r.system, { totalSeconds: r.totalSeconds, downtimeMs: r.downtimeMs, wireBytes: r.wireBytes }]))));
} else {
  const bestQemu = Math.min(...rows.filter((r) => r.system !== 'handoff').map((r) => r.totalSeconds));
  console.log(`\n256 MiB busybox guest (TCG, writes rotating over ${workingSetFiles} tmpfs file(s)), ${rateMbit} Mbit/s shaped link; QEMU moves RAM only, the handoff RAM and disk\n`);
  const converged = (r: Row): boolean => Number.isFinite(r.totalSeconds);
  console.log(
    formatTable([
      ['system', 'total s', 'downtime ms', 'wire MB', 'total / best QEMU'],
      ...rows.map((r) => [
        r.system,
        converged(r) ? r.totalSeconds.toFixed(2) : `no convergence in ${CONVERGE_LIMIT_S} s`,
        converged(r) ? String(Math.round(r.downtimeMs)) : '-',
        (r.wireBytes / 1e6).toFixed(2),
        converged(r) && Number.isFinite(bestQemu) ? (r.totalSeconds / bestQemu).toFixed(3) : '-',
      ]),
    ]),
  );
}
