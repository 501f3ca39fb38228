/**
 * Concurrent-handoff benchmark: 1, 2, 4 and 8 handoffs of the same images at once through one set of
 * actors on one nats-server, each to a destination of its own on a link capped at --bandwidth; each
 * handoff's time against the same handoff alone, and the handoffs' wire bytes over their wall time
 * against the links' sum. Then a fast-link handoff beside one behind a 5 Mbit/s shaped link (a
 * network namespace: root needed), and the actors' RSS over waves of handoffs.
 *
 *   npm run load:concurrent -- [--memory-size 128MiB] [--disk-size 128MiB] [--bandwidth 50mbit] [--mode zstd:1] [--counts 1,2,4,8] [--waves 13] [--json]
 */
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { spawnActor, stopActors, type ActorProcess } from '../cli/actors.js';
import { spawnReceiverProcess, type ReceiverProcess } from '../cli/receive.js';
import { formatTable, type MigrationSummary } from '../cli/summary.js';
import { stopProcess } from '../shared/actor/child.js';
import { startEmbeddedNats } from '../shared/bus/nats-server.js';
import { parseRateBps, parseSizeBytes } from '../shared/config/units.js';
import { generateImageSet } from '../shared/testdata/images.js';
import { ensureLocalLinkKey } from '../shared/wire/link-security.js';
import { migrateOn } from './lib/hosts.js';
import { createShapedLink } from './lib/wan.js';

const { values } = parseArgs({
  options: {
    'memory-size': { type: 'string' },
    'disk-size': { type: 'string' },
    bandwidth: { type: 'string' },
    counts: { type: 'string' },
    waves: { type: 'string' },
    mode: { type: 'string' },
    json: { type: 'boolean' },
  },
});
const bandwidth = values.bandwidth ?? '50mbit';
const bandwidthBps = parseRateBps(bandwidth);
// one mode for every handoff: the tuner would pick a cheaper one on uncapped links, and the CPU bound
// would be another mode's
const mode = values.mode ?? 'zstd:1';
const counts = (values.counts ?? '1,2,4,8').split(',').map(Number);
const waves = Number(values.waves ?? 13);
const SLOW_BPS = 5e6;
const WAVE_SIZE = 4;

// both ends run from here: the link's key made for this run, before the actors inherit our environment
ensureLocalLinkKey();
const dir = await mkdtemp(join(tmpdir(), 'handoff-concurrent-'));
const images = await generateImageSet({ dir: join(dir, 'source'), memoryBytes: parseSizeBytes(values['memory-size'] ?? '128MiB'), diskBytes: parseSizeBytes(values['disk-size'] ?? '128MiB'), seed: 83 });
const link = createShapedLink(SLOW_BPS, `lc${process.pid % 10000}`);
const source = ['ip', 'netns', 'exec', link.sourceNs];
const nats = await startEmbeddedNats({ prefix: source });
const actors: ActorProcess[] = (['capture', 'dedup', 'delta', 'compress', 'sender', 'tuner'] as const).map((name) => spawnActor(name, nats.url, { prefix: source }));
let nextPort = 7600;
let nextId = 0;

interface Handoff {
  summary: MigrationSummary;
  seconds: number;
}

/** one handoff to a fresh destination: on the slow (shaped) link, or on loopback capped at --bandwidth (`capped`) or not */
async function handoff(slow: boolean, capped = true): Promise<Handoff> {
  const id = `lc-${nextId++}`;
  const port = nextPort++;
  const dest: ReceiverProcess = await spawnReceiverProcess({
    baseMemory: images.baseMemory,
    baseDisk: images.baseDisk,
    outDir: join(dir, 'destination', id),
    listen: slow ? `${link.destIp}:${port}` : `127.0.0.1:${port}`,
    prefix: ['ip', 'netns', 'exec', slow ? link.destNs : link.sourceNs],
  });
  try {
    const started = performance.now();
    const args = ['--base-memory', images.baseMemory, '--memory', images.memory, '--base-disk', images.baseDisk, '--disk', images.disk, '--to', dest.address, '--nats', nats.url, '--external-actors', '--id', id, '--mode', mode];
    const summary = await migrateOn(source, slow || !capped ? args : [...args, '--bandwidth', bandwidth]);
    if (!summary.verified) throw new Error(`handoff ${id} did not verify: ${summary.reason}`);
    return { summary, seconds: (performance.now() - started) / 1000 };
  } finally {
    await stopProcess(dest.child, 5000);
    await rm(join(dir, 'destination', id), { recursive: true, force: true });
  }
}

/** the actors' resident memory added up (MiB), from /proc (their node processes, under the netns prefix) */
function actorsRssMiB(): number {
  let kib = 0;
  for (const a of actors) {
    for (const pid of [a.child.pid, ...childPids(a.child.pid)]) {
      const m = /VmRSS:\s+(\d+)/.exec(safeRead(`/proc/${pid}/status`));
      if (m) kib += Number(m[1]);
    }
  }
  return kib / 1024;
}
const safeRead = (path: string): string => {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
};
const childPids = (pid: number | undefined): number[] => safeRead(`/proc/${pid}/task/${pid}/children`).trim().split(/\s+/).filter(Boolean).map(Number);

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

try {
  await Promise.all(actors.map((a) => a.ready));
  await handoff(false); // warm: the base's hash index, the actors' first chunks
  const alone = (await handoff(false)).seconds;
  // what the source's two cores carry: WAVE_SIZE handoffs at once on uncapped loopback links
  const cpuStarted = performance.now();
  const uncapped = await Promise.all(Array.from({ length: WAVE_SIZE }, () => handoff(false, false)));
  const cpuBoundMbit = uncapped.reduce((sum, h) => sum + h.summary.wireBytes * 8, 0) / ((performance.now() - cpuStarted) / 1000) / 1e6;
  const rows = [['handoffs at once', 'median handoff (s)', 'vs alone', 'wall (s)', 'wire Mbit/s', 'links sum Mbit/s', 'bound by', 'of bound']];
  const runs: Record<string, unknown>[] = [];
  for (const n of counts) {
    const started = performance.now();
    const done = await Promise.all(Array.from({ length: n }, () => handoff(false)));
    const wallS = (performance.now() - started) / 1000;
    const wireMbit = done.reduce((sum, h) => sum + h.summary.wireBytes * 8, 0) / wallS / 1e6;
    const med = median(done.map((h) => h.seconds));
    const linksMbit = (n * bandwidthBps) / 1e6;
    const cpuBound = cpuBoundMbit < linksMbit;
    rows.push([String(n), med.toFixed(2), `${(med / alone).toFixed(2)}x`, wallS.toFixed(2), wireMbit.toFixed(1), linksMbit.toFixed(0), cpuBound ? `CPU (${cpuBoundMbit.toFixed(0)})` : 'links', (wireMbit / Math.min(linksMbit, cpuBoundMbit)).toFixed(2)]);
    runs.push({ concurrent: n, handoffSeconds: done.map((h) => h.seconds), wallSeconds: wallS, wireBytes: done.map((h) => h.summary.wireBytes), boundBy: cpuBound ? 'cpu' : 'links' });
  }
  process.stdout.write(`same images (${mode}), each on its own ${bandwidth} link; alone: ${alone.toFixed(2)} s; the source's CPU carries ${cpuBoundMbit.toFixed(0)} Mbit/s of wire (${WAVE_SIZE} at once, uncapped)\n${formatTable(rows)}\n\n`);

  const slow = handoff(true);
  await new Promise((r) => setTimeout(r, 500));
  const fastBeside = (await handoff(false)).seconds;
  const slowSeconds = (await slow).seconds;
  process.stdout.write(formatTable([
    ['fast-link handoff', 'seconds', 'vs alone'],
    ['alone', alone.toFixed(2), '1.00x'],
    [`beside a ${SLOW_BPS / 1e6} Mbit/s one (${slowSeconds.toFixed(1)} s)`, fastBeside.toFixed(2), `${(fastBeside / alone).toFixed(2)}x`],
  ]) + '\n\n');

  const rss: number[] = [actorsRssMiB()];
  for (let w = 0; w < waves; w++) {
    await Promise.all(Array.from({ length: WAVE_SIZE }, () => handoff(false)));
    rss.push(actorsRssMiB());
  }
  const rssRows = [['after wave', 'handoffs', 'actors RSS (MiB)']];
  rss.forEach((mib, w) => rssRows.push([String(w), String(w * WAVE_SIZE), mib.toFixed(0)]));
  process.stdout.write(`${formatTable(rssRows)}\n`);
  if (values.json) process.stdout.write(`${JSON.stringify({ bandwidth, mode, aloneSeconds: alone, cpuBoundWireMbit: cpuBoundMbit, runs, fastBeside, slowSeconds, rssMiB: rss })}\n`);
} finally {
  await stopActors(actors);
  await nats.stop();
  link.destroy();
  await rm(dir, { recursive: true, force: true });
}
