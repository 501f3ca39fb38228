/**
 * A real Debian 12 guest (load/guests/debian.sh: systemd, a Python service holding ~200 MB of state
 * and replacing ~300 KB/s of it, a log on disk, a virtio NIC), 1 GiB RAM and an 8 GiB disk, started
 * the ordinary way (ordinary RAM, QEMU's default devices), handed off over a shaped link between two
 * network namespaces by this system and by QEMU's own live migration (plain, and multifd + zstd;
 * QEMU moves RAM only, the disk shared), side by side. Root needed.
 *
 *   npm run load:real-vm -- [--rate-mbit 10] [--session-seconds 60] [--only handoff,qemu-plain,qemu-multifd-zstd] [--json]
 *                           [--summary-out FILE]   (this system's whole migrate summary, as JSON)
 *
 * The service is probed over HTTP through the VM's NIC (QEMU's user networking, a forwarded port)
 * every 100 ms at both ends: `serviceUnreachableSeconds` is the longest time no end answered, and an
 * answer whose sequence number is below one seen before is a lost state. The information proxy, for
 * this system: zstd -19 of the pages of the RAM at the stop (as the destination rebuilt it) that
 * survive dedup, raw or xor'd against their base pages, whichever is smaller: what an ideal encoder
 * would send of RAM.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { formatTable } from '../cli/summary.js';
import { stopProcess } from '../shared/actor/child.js';
import { spawnActor, stopActors } from '../cli/actors.js';
import { spawnReceiverProcess, type ReceiverProcess } from '../cli/receive.js';
import { ensureLocalLinkKey } from '../shared/wire/link-security.js';
import { startEmbeddedNats } from '../shared/bus/nats-server.js';
import { BlockCompressor } from '../shared/codecs/block.js';
import { PAGE_SIZE, ZERO_PAGE, strongHash } from '../shared/image/pages.js';
import { QEMU_BIN, accelerator } from '../shared/vm/qemu.js';
import { QmpClient } from '../shared/vm/qmp.js';
import { migrateOn } from './lib/hosts.js';
import { qemuLiveMigration } from './lib/qemu-live.js';
import { createShapedLink } from './lib/wan.js';

const { values } = parseArgs({
  options: { 'rate-mbit': { type: 'string' }, 'session-seconds': { type: 'string' }, only: { type: 'string' }, json: { type: 'boolean' }, 'converge-limit': { type: 'string' }, 'summary-out': { type: 'string' } },
});
const rateMbit = Number(values['rate-mbit'] ?? 10);
const sessionSeconds = Number(values['session-seconds'] ?? 60);
const convergeLimitS = Number(values['converge-limit'] ?? 300);
if (!(rateMbit > 0) || !(sessionSeconds >= 0) || !(convergeLimitS > 0)) {
  console.error('--rate-mbit and --converge-limit must be > 0, --session-seconds >= 0');
  process.exit(2);
}
if (process.getuid?.() !== 0) {
  console.error('load:real-vm needs root: it makes two network namespaces joined by a shaped link');
  process.exit(2);
}

type System = 'handoff' | 'qemu-plain' | 'qemu-multifd-zstd';
interface Row {
  system: System;
  /** undefined: did not converge within the limit */
  totalSeconds: number | undefined;
  downtimeMs: number | undefined;
  wireBytes: number;
  serviceUnreachableSeconds: number;
  lostStateAnswers: number;
  /** this system only */
  informationProxyBytes?: number;
  reason?: string;
}

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const MAIN = join(ROOT, 'dist', 'cli', 'main.js');
const say = (text: string): void => void (values.json || process.stderr.write(`${text}\n`));
const SERVICE_PORT = 18080;

say('building (or reusing) the Debian guest ...');
const guestDir = execFileSync('bash', [join(ROOT, 'load', 'guests', 'debian.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }).trim().split('\n').at(-1)!;
const guest = { kernel: join(ROOT, guestDir, 'vmlinuz'), initrd: join(ROOT, guestDir, 'initrd.img'), disk: join(ROOT, guestDir, 'disk.img'), append: readFileSync(join(ROOT, guestDir, 'cmdline'), 'utf8').trim() };

// both cloudlets' link key, for this run (the processes it starts inherit it)
ensureLocalLinkKey();
const dir = await mkdtemp(join(tmpdir(), 'handoff-real-vm-'));
const link = createShapedLink(rateMbit * 1e6, `rv${process.pid % 10000}`);
const inNs = (ns: string): string[] => ['ip', 'netns', 'exec', ns];
// the actors: `ip netns exec` remounts /sys, and capture then finds no cgroup to slow the guest with
const enterNs = (ns: string): string[] => ['nsenter', `--net=/var/run/netns/${ns}`];

/** The command line such a user writes. */
function userArgv(disk: string, qmp: string, serial: string): string[] {
  return [
    ...[QEMU_BIN, '-machine', `q35,accel=${accelerator()}`, '-m', '1G', '-smp', '1', '-display', 'none'],
    ...['-kernel', guest.kernel, '-initrd', guest.initrd, '-append', `${guest.append} console=ttyS0`],
    ...['-drive', `file=${disk},format=raw,if=virtio`],
    ...['-nic', `user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:${SERVICE_PORT}-:8080`],
    ...['-serial', `file:${serial}`, '-qmp', `unix:${qmp},server=on,wait=off`],
  ];
}

function startVm(ns: string, argv: string[]): ChildProcess {
  return spawn('ip', ['netns', 'exec', ns, ...argv], { stdio: ['ignore', 'ignore', 'inherit'] });
}

/** Polls the service in `ns` every 100 ms; one JSON line per answer or failure. */
function prober(ns: string): { child: ChildProcess; answers: { t: number; seq?: number }[] } {
  const script = `const http = require('node:http');
setInterval(() => {
  const t = Date.now();
  const req = http.get({ host: '127.0.0.1', port: ${SERVICE_PORT}, path: '/state', timeout: 300 }, (res) => {
    let b = ''; res.on('data', (d) => (b += d)); res.on('end', () => { try { console.log(JSON.stringify({ t, seq: JSON.parse(b).seq })); } catch { console.log(JSON.stringify({ t })); } });
  });
  req.on('timeout', () => req.destroy()); req.on('error', () => console.log(JSON.stringify({ t })));
}, 100);`;
  const child = spawn('ip', ['netns', 'exec', ns, process.execPath, '-e', script], { stdio: ['ignore', 'pipe', 'ignore'] });
  const answers: { t: number; seq?: number }[] = [];
  let rest = '';
  child.stdout!.on('data', (d: Buffer) => {
    const lines = (rest + d.toString()).split('\n');
    rest = lines.pop()!;
    for (const l of lines) if (l) answers.push(JSON.parse(l) as { t: number; seq?: number });
  });
  return { child, answers };
}

/** The longest stretch with no answer from either end, and answers that went back in sequence. */
function serviceFigures(a: { t: number; seq?: number }[], b: { t: number; seq?: number }[]): { unreachableSeconds: number; lostStateAnswers: number } {
  const ok = [...a, ...b].filter((x) => x.seq !== undefined).sort((x, y) => x.t - y.t);
  let gap = 0;
  let lost = 0;
  let maxSeq = -1;
  for (let i = 0; i < ok.length; i++) {
    if (i > 0) gap = Math.max(gap, ok[i]!.t - ok[i - 1]!.t);
    if (ok[i]!.seq! < maxSeq) lost++;
    maxSeq = Math.max(maxSeq, ok[i]!.seq!);
  }
  return { unreachableSeconds: gap / 1000, lostStateAnswers: lost };
}

/** Resolves once the prober in that namespace has had an answer. */
async function waitService(probe: { answers: { seq?: number }[] }, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!probe.answers.some((a) => a.seq !== undefined)) {
    if (Date.now() > deadline) throw new Error(`the guest's service did not answer within ${timeoutMs / 1000} s`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

function sparseCopy(from: string, to: string): void {
  execFileSync('cp', ['--sparse=always', '--reflink=auto', from, to]);
}

/** zstd -19 of the pages of `now` that dedup leaves (not zero, not any base page, not already seen), raw or xor'd with their base page. */
function informationProxy(baseMemory: string, nowMemory: string): { dirtyPages: number; survivors: number; bytes: number } {
  const base = readFileSync(baseMemory);
  const now = readFileSync(nowMemory);
  const basePages = new Set<string>();
  for (let at = 0; at < base.byteLength; at += PAGE_SIZE) basePages.add(strongHash(base.subarray(at, at + PAGE_SIZE)).toString('hex'));
  const seen = new Set<string>();
  const raw: Buffer[] = [];
  const xored: Buffer[] = [];
  let dirtyPages = 0;
  for (let at = 0; at < now.byteLength; at += PAGE_SIZE) {
    const page = now.subarray(at, at + PAGE_SIZE);
    const basePage = base.subarray(at, at + PAGE_SIZE);
    if (page.equals(basePage)) continue;
    dirtyPages++;
    const h = strongHash(page).toString('hex');
    if (page.equals(ZERO_PAGE) || basePages.has(h) || seen.has(h)) continue;
    seen.add(h);
    raw.push(Buffer.from(page));
    const x = Buffer.alloc(PAGE_SIZE);
    for (let i = 0; i < PAGE_SIZE; i++) x[i] = page[i]! ^ (basePage[i] ?? 0);
    xored.push(x);
  }
  const zstd19 = (parts: Buffer[]): number => new BlockCompressor().compress(Buffer.concat(parts), 'zstd', 19).byteLength;
  return { dirtyPages, survivors: raw.length, bytes: Math.min(zstd19(raw), zstd19(xored)) };
}

async function handoffRun(): Promise<Row> {
  const src = join(dir, 'handoff-src');
  const dst = join(dir, 'handoff-dst');
  mkdirSync(src, { recursive: true });
  mkdirSync(dst, { recursive: true });
  sparseCopy(guest.disk, join(src, 'disk.img'));
  const qmp = join(src, 'qmp.sock');
  const vm = startVm(link.sourceNs, userArgv(join(src, 'disk.img'), qmp, join(src, 'serial.log')));
  const nats = await startEmbeddedNats({ prefix: inNs(link.sourceNs) });
  const actors = (['capture', 'dedup', 'delta', 'compress', 'compress', 'sender', 'tuner'] as const).map((name) => spawnActor(name, nats.url, { prefix: enterNs(link.sourceNs) }));
  let receiver: ReceiverProcess | undefined;
  const probes = [prober(link.sourceNs), prober(link.destNs)];
  try {
    await waitService(probes[0]!, 300_000);
    // every cloudlet holds the base: taken once at the source, copied to the destination
    execFileSync('ip', [...inNs(link.sourceNs).slice(1), process.execPath, MAIN, 'base', '--qmp', qmp, '--out', join(src, 'base')], { stdio: 'inherit' });
    execFileSync('cp', ['-a', '--sparse=always', join(src, 'base'), join(dst, 'base')]);
    receiver = await spawnReceiverProcess({ base: join(dst, 'base'), outDir: join(dst, 'out'), listen: `${link.destIp}:7300`, prefix: inNs(link.destNs), stream: {}, forwardLogs: process.env.HANDOFF_LOG_LEVEL !== undefined });
    await new Promise((r) => setTimeout(r, sessionSeconds * 1000));
    const sentBefore = link.sentBytes();
    say(`migrate starts at ${new Date().toISOString()}`);
    const s = await migrateOn(inNs(link.sourceNs), ['--external-actors', '--nats', nats.url, '--qmp', qmp, '--base', join(src, 'base'), '--to', receiver.address]);
    if (!s.verified) say(`the destination's last words: ${receiver.logTail().slice(-2000)}`);
    const wireBytes = link.sentBytes() - sentBefore;
    if (values['summary-out']) writeFileSync(values['summary-out'], JSON.stringify(s, null, 2));
    await new Promise((r) => setTimeout(r, 5000));
    const service = serviceFigures(probes[0]!.answers, probes[1]!.answers);
    // what an ideal encoder would have sent of RAM: the state at the stop, as the destination rebuilt it
    const proxy = s.verified ? informationProxy(join(src, 'base', 'memory.img'), join(dst, 'out', 'memory.img')) : undefined;
    if (proxy) say(`information proxy at the stop: ${proxy.dirtyPages} dirty pages, ${proxy.survivors} survive dedup, zstd -19 ${(proxy.bytes / 2 ** 20).toFixed(1)} MiB`);
    say(`handoff: ${s.verified ? `${s.handoffSeconds.toFixed(1)} s, downtime ${s.downtimeMs} ms` : `failed: ${s.reason}`}`);
    return {
      system: 'handoff',
      totalSeconds: s.verified ? s.handoffSeconds : undefined,
      downtimeMs: s.verified ? s.downtimeMs : undefined,
      wireBytes,
      serviceUnreachableSeconds: service.unreachableSeconds,
      lostStateAnswers: service.lostStateAnswers,
      ...(proxy ? { informationProxyBytes: proxy.bytes } : {}),
      ...(s.verified ? {} : { reason: s.reason ?? 'not verified' }),
    };
  } finally {
    for (const p of probes) p.child.kill();
    await stopActors(actors);
    await nats.stop();
    if (receiver) await stopProcess(receiver.child, 5000);
    vm.kill('SIGKILL');
    try {
      execFileSync('pkill', ['-9', '-f', dst]);
    } catch {
      // the destination VM was not started
    }
  }
}

/** QEMU's own live migration of the same guest to a QEMU in the destination namespace (the disk shared). */
async function qemuRun(system: 'qemu-plain' | 'qemu-multifd-zstd'): Promise<Row> {
  const src = join(dir, `${system}-src`);
  mkdirSync(src, { recursive: true });
  sparseCopy(guest.disk, join(src, 'disk.img'));
  const argv = userArgv(join(src, 'disk.img'), join(src, 'qmp.sock'), join(src, 'serial.log'));
  const vm = startVm(link.sourceNs, argv);
  const target = startVm(link.destNs, [...userArgv(join(src, 'disk.img'), join(src, 'qmp-dst.sock'), join(src, 'serial-dst.log')), '-incoming', 'defer']);
  const probes = [prober(link.sourceNs), prober(link.destNs)];
  let source: QmpClient | undefined;
  let dest: QmpClient | undefined;
  try {
    await waitService(probes[0]!, 300_000);
    await new Promise((r) => setTimeout(r, sessionSeconds * 1000));
    source = await QmpClient.connect(join(src, 'qmp.sock'));
    dest = await QmpClient.connect(join(src, 'qmp-dst.sock'));
    const run = await qemuLiveMigration(source, dest, `tcp:${link.destIp}:7400`, { multifd: system === 'qemu-multifd-zstd', limitSeconds: convergeLimitS, sentBytes: link.sentBytes });
    await new Promise((r) => setTimeout(r, 5000));
    const service = serviceFigures(probes[0]!.answers, probes[1]!.answers);
    say(`${system}: ${run.converged ? `${run.totalSeconds!.toFixed(1)} s, downtime ${run.downtimeMs} ms` : `no convergence within ${convergeLimitS} s`}`);
    return {
      system,
      totalSeconds: run.totalSeconds,
      downtimeMs: run.downtimeMs,
      wireBytes: run.wireBytes,
      serviceUnreachableSeconds: service.unreachableSeconds,
      lostStateAnswers: service.lostStateAnswers,
    };
  } finally {
    for (const p of probes) p.child.kill();
    source?.close();
    dest?.close();
    vm.kill('SIGKILL');
    target.kill('SIGKILL');
  }
}

const rows: Row[] = [];
const systems = (values.only ?? 'handoff,qemu-plain,qemu-multifd-zstd').split(',') as System[];
try {
  for (const system of systems) rows.push(system === 'handoff' ? await handoffRun() : await qemuRun(system));
} finally {
  link.destroy();
  await rm(dir, { recursive: true, force: true });
}

if (values.json) {
  console.log(JSON.stringify(Object.fromEntries(rows.map(({ system, ...r }) => [system, r]))));
} else {
  const handoff = rows.find((r) => r.system === 'handoff');
  console.log(`\nDebian 12 guest (1 GiB RAM, 8 GiB disk, a service changing ~300 KB/s of its state), ${rateMbit} Mbit/s, ${sessionSeconds} s after its base, TCG\n`);
  console.log(
    formatTable([
      ['system', 'total s', 'downtime ms', 'wire MB', 'unreachable s', 'lost-state answers', 'total / handoff'],
      ...rows.map((r) => [
        r.system,
        r.totalSeconds === undefined ? (r.reason ? `failed: ${r.reason.slice(0, 60)}` : `no convergence in ${convergeLimitS} s`) : r.totalSeconds.toFixed(1),
        r.downtimeMs === undefined ? '-' : String(Math.round(r.downtimeMs)),
        (r.wireBytes / 1e6).toFixed(1),
        r.serviceUnreachableSeconds.toFixed(2),
        String(r.lostStateAnswers),
        r.totalSeconds !== undefined && handoff?.totalSeconds ? (r.totalSeconds / handoff.totalSeconds).toFixed(2) : '-',
      ]),
    ]),
  );
  if (handoff?.informationProxyBytes !== undefined)
    console.log(`\ninformation proxy (zstd -19 of the dedup survivors, raw or xor'd): ${(handoff.informationProxyBytes / 2 ** 20).toFixed(1)} MiB = ${((handoff.informationProxyBytes * 8) / (rateMbit * 1e6)).toFixed(1)} s of the link`);
}
