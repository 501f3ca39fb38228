/**
 * npm run load:adaptive — handoff time of static modes and of adaptive over a real shaped link (two
 * network namespaces, `tc tbf` on the source side), at fixed bandwidths, with the bandwidth changing
 * mid-handoff (2 -> 200 -> 2 Mbit/s), and with another tenant taking two thirds of the source's core
 * mid-handoff at 200 Mbit/s.
 * Prints a table of handoff times, one of transfer times (from the destination's accept, without the
 * actors' start-up) and one of the source's CPU seconds; for the scenarios in phases, what each mode
 * moved in each phase, the best static mode of each, and the oracle bound (each phase's best mode
 * from its first byte). Writes an SVG plot of handoff time against bandwidth; `--json` prints every run.
 * Each scenario runs every mode `--repeat` times (default 5), interleaved, and compares medians: one
 * run on a shared machine varies by more than the differences being judged, a short one most.
 * The two cloudlets split the machine's cores (`--cpus N`: the source's actors, its nats-server and
 * the hog on the first N, default half; the destination on the rest; `--cpus all`: both share every
 * core). Sharing, the destination's reconstruction takes CPU from the source at random, and each
 * cloudlet has more cores than its own: every static mode keeps up and one is best throughout. A
 * cloudlet short of cores is where the best mode moves with bandwidth and load.
 * Needs root (namespaces and tc); it sets up and removes its own namespaces.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { spawnReceiverProcess } from '../cli/receive.js';
import { formatTable, type MigrationSummary } from '../cli/summary.js';
import { generateImageSet, type ImageSet } from '../shared/testdata/images.js';
import { parseSizeBytes } from '../shared/config/units.js';
import { cpuSecondsOf, endedChildrenCpuSeconds, stopWithChildren, stoppedHog } from './lib/processes.js';
import { createCpuGroups, type CpuGroups } from './lib/cgroups.js';
import { createShapedLink, type ShapedLink } from './lib/wan.js';
import { oracleSeconds, phaseProgress, type LinkSample, type Phase, type PhaseProgress } from './lib/phases.js';

const MAIN = fileURLToPath(new URL('../cli/main.js', import.meta.url));

interface Candidate {
  name: string;
  args: string[];
  /** compared only when asked for by --modes */
  onRequest?: true;
}

const CANDIDATES: Candidate[] = [
  { name: 'raw', args: ['--mode', 'none', '--delta', 'none'] },
  { name: 'lz4', args: ['--mode', 'lz4', '--delta', 'none'] },
  { name: 'xor+zstd3', args: ['--mode', 'zstd:3', '--delta', 'xor'] },
  // the strongest mode before patch, on request only: patch3 sends less at a fraction of its CPU
  { name: 'xor+zstd19', args: ['--mode', 'zstd:19', '--delta', 'xor'], onRequest: true },
  // each page zstd-compressed with its base page as the dictionary, nothing after; on request only:
  // patch3 sends less for about its CPU
  { name: 'zstd-delta', args: ['--mode', 'none', '--delta', 'zstd'], onRequest: true },
  // each chunk's pages as one zstd frame against their base pages, cheap and strong
  { name: 'patch3', args: ['--mode', 'zstd:3', '--delta', 'patch'] },
  { name: 'patch19', args: ['--mode', 'zstd:19', '--delta', 'patch'] },
  { name: 'adaptive', args: ['--mode', 'adaptive'] },
];

interface Run {
  scenario: string;
  mode: string;
  repetition: number;
  bandwidthMbit: number | null;
  handoffSeconds: number;
  /** from the destination's accept to its verified result: the handoff less the actors' start-up */
  transferSeconds: number;
  wireBytes: number;
  /** dirty input captured */
  inputBytes: number;
  /** a scenario in phases: what the run moved in each */
  phases?: PhaseProgress[];
  /**
   * CPU seconds of the source's processes (the command, its actors, its nats-server), start-up
   * included: what a mode costs the source cloudlet, without the scheduler's noise in wall time
   */
  sourceCpuSeconds: number;
  /** the hog run: the share of a core the hog took from when it started spinning to the transfer's end */
  hogCoreShare?: number;
  verified: boolean;
  switches: number;
  /** adaptive: the tuner's switches, "at seconds: mode" */
  decisions?: string[];
}

interface Scenario {
  name: string;
  startMbit: number;
  /** [seconds after start, Mbit/s] */
  changes?: [number, number][];
  /** seconds after the destination's accept when the CPU hog starts spinning */
  hogAfterSeconds?: number;
  /** a scenario whose conditions change: its phases, timed from the accept */
  phases?: Phase[];
  /** the VM it moves: the fixed-bandwidth one, or the larger one sized for phases */
  vm: 'fixed' | 'phased';
}

/**
 * the hog's scheduling group: the handoff's (one more task beside its processes), a session of its
 * own (autogroup), or `tenant`: the handoff and the hog each in a CPU cgroup of equal weight, two
 * containers on one cloudlet (the hog then takes half the core whenever the handoff wants all of it)
 */
type HogGroup = 'own' | 'shared' | 'tenant';

/** where each cloudlet runs: `taskset` arguments for its commands (none: any core) */
interface Placement {
  source: string[];
  destination: string[];
  /** the source's cores, for the JSON */
  sourceCpus: number;
}

function placement(cpus: string): Placement {
  const cores = availableParallelism();
  if (cpus === 'all') return { source: [], destination: [], sourceCpus: cores };
  const n = Number(cpus);
  if (!(Number.isInteger(n) && n >= 1 && n <= cores)) throw new Error(`--cpus must be all or a whole number from 1 to this machine's ${cores}`);
  if (n === cores) return { source: [], destination: [], sourceCpus: cores };
  return { source: ['taskset', '-c', `0-${n - 1}`], destination: ['taskset', '-c', `${n}-${cores - 1}`], sourceCpus: n };
}

/** The share of a core the hog took from its first sample to the last before the transfer's end. */
function hogShare(samples: readonly { atMs: number; cpuSeconds: number }[], transferSeconds: number): { hogCoreShare?: number } {
  const first = samples[0];
  const last = samples.filter((x) => x.atMs <= transferSeconds * 1000).at(-1);
  if (!first || !last || last.atMs - first.atMs < 100) return {};
  return { hogCoreShare: Number(((last.cpuSeconds - first.cpuSeconds) / ((last.atMs - first.atMs) / 1000)).toFixed(2)) };
}

/** stops the run under way (its command, the hog, the receiver): for a benchmark stopped by a signal */
let stopRunning: (() => void) | undefined;

async function handoff(link: ShapedLink, imagesOf: Partial<Record<Scenario['vm'], ImageSet>>, dir: string, c: Candidate, s: Scenario, repetition: number, cpus: Placement, hogGroup: HogGroup, groups: CpuGroups | undefined): Promise<Run> {
  const images = imagesOf[s.vm]!;
  link.setRate(s.startMbit * 1e6);
  // on the source's cores: it takes one of the cloudlet's own; stopped until its moment
  const hog = s.hogAfterSeconds === undefined ? undefined : await stoppedHog([...(groups?.prefix('hog') ?? []), ...cpus.source], hogGroup === 'own');
  stopRunning = (): void => void hog?.kill('SIGKILL');
  /** the hog's CPU seconds every 50 ms from the accept: what it took during the transfer */
  const hogCpu: { atMs: number; cpuSeconds: number }[] = [];
  let acceptedMs: number | undefined;
  /** the link's counter at the accept and as each later phase began: what each phase moved */
  const phaseStarts: LinkSample[] = [];
  // timed before the counter is read: each read (tens of ms) then starts its phase as late as the others
  const phaseBegins = (read: () => number): void => {
    const atSeconds = (performance.now() - acceptedMs!) / 1000;
    phaseStarts.push({ atSeconds, sentBytes: read() });
  };
  const receiver = await spawnReceiverProcess({
    baseMemory: images.baseMemory,
    baseDisk: images.baseDisk,
    outDir: join(dir, 'out'),
    listen: `${link.destIp}:7300`,
    prefix: [...cpus.destination, 'ip', 'netns', 'exec', link.destNs],
    // its "accepted" line starts the scenario's clock
    env: { HANDOFF_LOG_LEVEL: 'info' },
  }).catch((err: unknown) => {
    hog?.kill('SIGKILL'); // stopped, it would stay behind
    throw err;
  });
  const timers: NodeJS.Timeout[] = [];
  let finished = false;
  try {
    const [command, ...args] = [...(groups?.prefix('handoff') ?? []), ...cpus.source, 'ip'];
    // the previous run's processes have all been waited for: from here, only this run's source ends
    const cpuBefore = await endedChildrenCpuSeconds();
    const child = spawn(
      command!,
      [...args, 'netns', 'exec', link.sourceNs, process.execPath, MAIN, 'migrate', '--base-memory', images.baseMemory, '--memory', images.memory, '--base-disk', images.baseDisk, '--disk', images.disk, '--to', receiver.address, '--json', '--no-progress', ...c.args],
      { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, HANDOFF_LOG_LEVEL: process.env.HANDOFF_LOG_LEVEL ?? 'warn' } },
    );
    // a benchmark stopped mid-run stops the command with its actors and nats-server, and the receiver with its own
    stopRunning = (): void => {
      stopWithChildren(child.pid);
      hog?.kill('SIGKILL');
      stopWithChildren(receiver.child.pid);
    };
    // the changes are timed from when the destination accepts, when data starts to flow: the same
    // share of the transfer however long the actors took to start
    void receiver.waitForLog(/ accepted /).then(() => {
      if (finished) return;
      acceptedMs = performance.now();
      phaseBegins(link.sentBytes);
      // the counter as the change is made, not after it: a read takes tens of ms, a megabyte at 200 Mbit/s
      for (const [atSeconds, mbit] of s.changes ?? []) timers.push(setTimeout(() => phaseBegins(() => link.setRate(mbit * 1e6)), atSeconds * 1000));
      if (hog && s.hogAfterSeconds !== undefined) {
        timers.push(
          setTimeout(() => {
            if (s.phases) phaseBegins(link.sentBytes);
            hog.kill('SIGCONT');
            const sample = (): void => {
              const cpuSeconds = cpuSecondsOf(hog.pid);
              if (cpuSeconds !== undefined) hogCpu.push({ atMs: performance.now() - acceptedMs!, cpuSeconds });
            };
            sample();
            timers.push(setInterval(sample, 50));
          }, s.hogAfterSeconds * 1000),
        );
      }
    });
    let out = '';
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    await new Promise<void>((resolve) => child.once('exit', () => resolve()));
    // taskset and ip exec the command in their own process: its tree is what ended here
    const sourceCpuSeconds = (await endedChildrenCpuSeconds()) - cpuBefore;
    const summary = JSON.parse(out) as MigrationSummary;
    // the end: everything the source sent, at the transfer's end (a phase timer may have fired after it)
    const end: LinkSample = { atSeconds: summary.transferSeconds, sentBytes: link.sentBytes() };
    if (!summary.verified) {
      // the destination's side of it (its logs go nowhere otherwise)
      const exitCode = receiver.child.exitCode ?? 'running';
      process.stderr.write(`${s.name} ${c.name}: not verified (${summary.reason ?? 'no reason given'}); destination receiver: ${exitCode}, its last log lines:\n${receiver.logTail()}\n`);
    }
    return {
      scenario: s.name,
      mode: c.name,
      repetition,
      bandwidthMbit: s.changes || s.hogAfterSeconds !== undefined ? null : s.startMbit,
      handoffSeconds: summary.handoffSeconds,
      transferSeconds: summary.transferSeconds,
      wireBytes: summary.wireBytes,
      inputBytes: summary.inputBytes,
      ...(s.phases ? { phases: phaseProgress(s.phases, phaseStarts, end, summary.inputBytes) } : {}),
      sourceCpuSeconds: Number(sourceCpuSeconds.toFixed(2)),
      ...hogShare(hogCpu, summary.transferSeconds),
      verified: summary.verified,
      switches: summary.decisions.filter((d) => d.from !== d.to).length,
      ...(summary.adaptive ? { decisions: summary.decisions.map((d) => `${d.atSeconds}s: ${d.to}, ${d.compressWorkersInUse ?? d.compressWorkers}/${d.compressWorkers} workers (${(d.bandwidthBps / 1e6).toFixed(1)} Mbit/s, ${d.spareCores} cores)`) } : {}),
    };
  } finally {
    stopRunning = undefined;
    finished = true;
    timers.forEach(clearTimeout); // the hog's sampling interval too
    receiver.child.kill('SIGTERM');
    // reaped before the next run reads its children's CPU
    if (hog && hog.exitCode === null && hog.signalCode === null) await new Promise((resolve) => (hog.once('exit', resolve), hog.kill('SIGKILL')));
    await receiver.exited;
  }
}

function svgPlot(runs: Run[], bandwidths: number[]): string {
  const W = 720;
  const H = 420;
  const left = 70;
  const bottom = 50;
  const fixed = runs.filter((r) => r.bandwidthMbit !== null);
  const maxT = Math.max(...fixed.map((r) => r.handoffSeconds)) * 1.1;
  const logMin = Math.log10(Math.min(...bandwidths));
  const logMax = Math.log10(Math.max(...bandwidths));
  const x = (mbit: number): number => left + ((Math.log10(mbit) - logMin) / (logMax - logMin || 1)) * (W - left - 30);
  const y = (t: number): number => H - bottom - (t / maxT) * (H - bottom - 30);
  const colors = ['#888', '#e67e22', '#2980b9', '#8e44ad', '#c0392b'];
  const parts = [`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`, `<rect width="${W}" height="${H}" fill="white"/>`];
  parts.push(`<line x1="${left}" y1="${H - bottom}" x2="${W - 20}" y2="${H - bottom}" stroke="black"/><line x1="${left}" y1="20" x2="${left}" y2="${H - bottom}" stroke="black"/>`);
  for (const b of bandwidths) parts.push(`<text x="${x(b)}" y="${H - bottom + 18}" text-anchor="middle">${b}</text>`);
  for (let i = 0; i <= 5; i++) {
    const t = (maxT * i) / 5;
    parts.push(`<text x="${left - 8}" y="${y(t) + 4}" text-anchor="end">${t.toFixed(0)}</text><line x1="${left}" y1="${y(t)}" x2="${W - 20}" y2="${y(t)}" stroke="#eee"/>`);
  }
  parts.push(`<text x="${(W + left) / 2}" y="${H - 10}" text-anchor="middle">bandwidth (Mbit/s, log scale)</text>`);
  parts.push(`<text x="16" y="${H / 2}" transform="rotate(-90 16 ${H / 2})" text-anchor="middle">handoff time (s)</text>`);
  CANDIDATES.forEach((c, i) => {
    const pts = fixed.filter((r) => r.mode === c.name).sort((a, b) => a.bandwidthMbit! - b.bandwidthMbit!);
    const color = colors[i % colors.length]!;
    parts.push(`<polyline fill="none" stroke="${color}" stroke-width="${c.name === 'adaptive' ? 3 : 1.5}" points="${pts.map((r) => `${x(r.bandwidthMbit!)},${y(r.handoffSeconds)}`).join(' ')}"/>`);
    parts.push(`<text x="${W - 150}" y="${30 + i * 16}" fill="${color}">${c.name}</text>`);
  });
  parts.push('</svg>');
  return parts.join('\n');
}

const HELP = `npm run load:adaptive -- [options]   (root: network namespaces and tc)

Handoff time of static modes (raw, lz4, xor+zstd3, patch3, patch19) and of adaptive over a shaped link
between two network namespaces: at fixed bandwidths; 2 -> 200 -> 2 Mbit/s mid-handoff; and 200 Mbit/s
with another tenant (a CPU cgroup of twice the handoff's weight) set spinning on the source's core
mid-handoff. Prints tables of medians (handoff time, transfer time from the destination's accept, and
the source's CPU seconds); under the first two, each mode's worst ratio to the best static mode of a
scenario. For the scenarios in phases, a table of what each mode moved in each phase (MB/s of dirty
input), the best static mode of each phase, and the oracle bound: the transfer time had each phase
gone at its best static mode's rate from its first byte, the most any switching between these modes
could gain. Writes an SVG plot.

  --bandwidths LIST     fixed bandwidths in Mbit/s (default 2,10,50,200,1000)
  --repeat N            runs of each scenario and mode, interleaved; medians compared (default 5)
  --only LIST           only scenarios whose name is, or else contains, one of these, e.g. "hog,2->"
  --modes LIST          only these modes, e.g. "patch3,adaptive" (also xor+zstd19 and zstd-delta,
                        not compared unless named)
  --content KIND        mixed (heap, text, random; default) or programs (this machine's executables)
  --cpus N|all          the source cloudlet's cores (the first N; default half the machine's), the
                        destination on the rest; all: both share every core
  --phases SLOW,FAST    2 -> 200 -> 2 Mbit/s: seconds at 2 Mbit/s from the accept, then seconds at 200
                        (default 20,0.5: with the default --phased-size, patch3 moves a quarter to
                        two fifths of the VM in each phase; a 200 Mbit/s phase that moves as much as
                        a 2 Mbit/s one is 1/100 as long)
  --phased-size SIZE    memory and disk (each) of the VM the scenarios in phases move (default 128MiB)
  --hog-mbit RATE       bandwidth of the CPU hog run (default 200)
  --hog-after SECONDS   when the hog starts spinning, from the accept (default 1.5, about a third of
                        patch3's transfer with the phased VM); 0: from the start, one phase
  --hog-group tenant|shared|own  tenant (default): the handoff and the hog each in a CPU cgroup, the
                        hog with --hog-weight times the handoff's weight, as two containers; shared:
                        the hog one more task in the handoff's scheduling group; own: a session of
                        its own under autogroup
  --hog-weight W        the hog's CPU weight over the handoff's, tenant only (default 2: the handoff
                        keeps about a third of its core)
  --memory-size SIZE    --disk-size SIZE   the VM of the fixed-bandwidth runs (default 64MiB each)
  --svg FILE            where the plot goes (default load/adaptive.svg)
  --json                one JSON object with every run instead of the tables
  --json-out FILE       that object to FILE as well, beside the tables
  HANDOFF_LOG_LEVEL=info|debug   the runs' logs (debug: every look of the tuner)`;

/** the median of `xs` (the lower of the middle two) */
function median(xs: readonly number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)]!;
}

/** A scenario in phases: each mode's median rate per phase, the best static one, and the oracle bound. */
interface PhaseReport {
  scenario: string;
  phases: { label: string; startSeconds: number; inputBpsByMode: Record<string, number>; bestStatic: string }[];
  /** the best static mode by median transfer time, and that time */
  bestStatic: string;
  bestStaticSeconds: number;
  adaptiveSeconds?: number;
  /** transfer time with each phase at its best static mode's rate from its start */
  oracleSeconds: number;
}

function phaseReport(s: Scenario, runs: readonly Run[], modes: readonly string[]): PhaseReport | undefined {
  if (!s.phases) return undefined;
  const these = runs.filter((r) => r.scenario === s.name);
  const transfer = (mode: string): number => median(these.filter((r) => r.mode === mode).map((r) => r.transferSeconds));
  const statics = modes.filter((m) => m !== 'adaptive');
  if (statics.length === 0) return undefined;
  const phases = s.phases.map((p) => {
    const inputBpsByMode: Record<string, number> = {};
    for (const m of modes) {
      // a run that ended before the phase moved nothing in it: it does not count against the mode
      const rates = these.filter((r) => r.mode === m).flatMap((r) => r.phases?.filter((x) => x.label === p.label && x.seconds > 0.05).map((x) => x.inputBps) ?? []);
      if (rates.length) inputBpsByMode[m] = median(rates);
    }
    const ranked = statics.filter((m) => inputBpsByMode[m] !== undefined).sort((a, b) => inputBpsByMode[b]! - inputBpsByMode[a]!);
    return { label: p.label, startSeconds: p.startSeconds, inputBpsByMode, bestStatic: ranked[0] ?? '-' };
  });
  const bestStatic = statics.reduce((a, b) => (transfer(b) < transfer(a) ? b : a));
  const inputBytes = median(these.map((r) => r.inputBytes));
  return {
    scenario: s.name,
    phases,
    bestStatic,
    bestStaticSeconds: transfer(bestStatic),
    ...(modes.includes('adaptive') ? { adaptiveSeconds: transfer('adaptive') } : {}),
    oracleSeconds: oracleSeconds(s.phases, phases.map((p) => (p.bestStatic === '-' ? 0 : p.inputBpsByMode[p.bestStatic]!)), inputBytes),
  };
}

function phaseTable(reports: readonly PhaseReport[], modes: readonly string[]): string[][] {
  const rows = [['scenario / phase (from s)', ...modes, 'best static']];
  for (const r of reports) {
    for (const p of r.phases) rows.push([`${r.scenario} / ${p.label} (${p.startSeconds})`, ...modes.map((m) => (p.inputBpsByMode[m] === undefined ? '-' : (p.inputBpsByMode[m] / 1e6).toFixed(2))), p.bestStatic]);
  }
  return rows;
}

function oracleTable(reports: readonly PhaseReport[]): string[][] {
  const rows = [['scenario', 'best static', 'its transfer s', 'oracle s', 'oracle / best', 'adaptive s', 'adaptive / best']];
  for (const r of reports) {
    const a = r.adaptiveSeconds;
    rows.push([r.scenario, r.bestStatic, r.bestStaticSeconds.toFixed(2), r.oracleSeconds.toFixed(2), (r.oracleSeconds / r.bestStaticSeconds).toFixed(3), a === undefined ? '-' : a.toFixed(2), a === undefined ? '-' : (a / r.bestStaticSeconds).toFixed(3)]);
  }
  return rows;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      'memory-size': { type: 'string', default: '64MiB' },
      'disk-size': { type: 'string', default: '64MiB' },
      'phased-size': { type: 'string', default: '128MiB' },
      bandwidths: { type: 'string', default: '2,10,50,200,1000' },
      /** what the VM wrote: mixed (heap, text, random) or programs (code and data of executables) */
      content: { type: 'string', default: 'mixed' },
      svg: { type: 'string', default: 'load/adaptive.svg' },
      json: { type: 'boolean', default: false },
      /** the --json object to this file as well, beside the tables */
      'json-out': { type: 'string' },
      repeat: { type: 'string', default: '5' },
      /** only scenarios whose name contains one of these (comma-separated), e.g. "hog,2->" */
      only: { type: 'string' },
      /** only these modes (comma-separated names from the table), e.g. "patch3,adaptive" */
      modes: { type: 'string' },
      /** the source cloudlet's cores: the first N (default half), the destination's the rest; all: shared */
      cpus: { type: 'string' },
      /** 2 -> 200 -> 2: seconds at 2 Mbit/s, then seconds at 200 */
      phases: { type: 'string', default: '20,0.5' },
      'hog-mbit': { type: 'string', default: '200' },
      'hog-after': { type: 'string', default: '1.5' },
      'hog-group': { type: 'string', default: 'tenant' },
      'hog-weight': { type: 'string', default: '2' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(HELP);
    return;
  }
  if (process.getuid?.() !== 0) throw new Error('load:adaptive needs root for network namespaces and tc');
  const bandwidths = values.bandwidths!.split(',').map(Number);
  if (!bandwidths.every((b) => b > 0)) throw new Error('--bandwidths must be Mbit/s figures above 0, e.g. 2,10,50');
  const repeat = Number(values.repeat);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error('--repeat must be a whole number >= 1');
  const cpus = placement(values.cpus ?? String(Math.max(1, Math.floor(availableParallelism() / 2))));
  const [slowSeconds, fastSeconds, ...extra] = values.phases!.split(',').map(Number);
  if (!(slowSeconds! > 0 && fastSeconds! > 0) || extra.length) throw new Error('--phases must be two durations in seconds, SLOW,FAST, e.g. 20,0.5');
  const hogMbit = Number(values['hog-mbit']);
  if (!(hogMbit > 0)) throw new Error('--hog-mbit must be a bandwidth in Mbit/s');
  const hogAfterSeconds = Number(values['hog-after']);
  if (!(hogAfterSeconds >= 0)) throw new Error('--hog-after must be seconds from the accept, 0 or more');
  const hogGroup = values['hog-group'];
  if (hogGroup !== 'own' && hogGroup !== 'shared' && hogGroup !== 'tenant') throw new Error('--hog-group must be tenant, shared or own');
  const hogWeight = Number(values['hog-weight']);
  if (!(hogWeight > 0)) throw new Error('--hog-weight must be a number above 0');
  const content = values.content;
  if (content !== 'mixed' && content !== 'programs') throw new Error('--content must be mixed or programs');
  const wantedModes = values.modes?.split(',');
  const unknownMode = wantedModes?.find((m) => !CANDIDATES.some((c) => c.name === m));
  if (unknownMode) throw new Error(`--modes: unknown mode ${unknownMode} (one of ${CANDIDATES.map((c) => c.name).join(', ')})`);
  const candidates = wantedModes ? CANDIDATES.filter((c) => wantedModes.includes(c.name)) : CANDIDATES.filter((c) => !c.onRequest);
  const modes = candidates.map((c) => c.name);

  const hogName = `CPU hog at ${hogMbit} Mbit/s${hogAfterSeconds > 0 ? ` from ${hogAfterSeconds} s` : ''}${hogGroup === 'tenant' ? `, weight ${hogWeight}:1` : `, ${hogGroup}`}`;
  const scenarios: Scenario[] = [
    ...bandwidths.map((b): Scenario => ({ name: `${b} Mbit/s`, startMbit: b, vm: 'fixed' })),
    {
      name: '2->200->2 Mbit/s',
      startMbit: 2,
      changes: [[slowSeconds!, 200], [slowSeconds! + fastSeconds!, 2]],
      phases: [
        { label: '2 Mbit/s', startSeconds: 0 },
        { label: '200 Mbit/s', startSeconds: slowSeconds! },
        { label: '2 Mbit/s again', startSeconds: slowSeconds! + fastSeconds! },
      ],
      vm: 'phased',
    },
    {
      name: hogName,
      startMbit: hogMbit,
      hogAfterSeconds,
      ...(hogAfterSeconds > 0 ? { phases: [{ label: 'no hog', startSeconds: 0 }, { label: 'hog', startSeconds: hogAfterSeconds }] } : {}),
      vm: 'phased',
    },
  ];
  const only = values.only?.split(',');
  // a whole name picks just that scenario ("2 Mbit/s", not 2->200->2 too); a part, every one holding it
  const picks = (s: Scenario, o: string): boolean => (scenarios.some((t) => t.name === o) ? s.name === o : s.name.includes(o));
  if (only) scenarios.splice(0, scenarios.length, ...scenarios.filter((s) => only.some((o) => picks(s, o))));
  if (scenarios.length === 0) throw new Error(`--only ${values.only}: no scenario matches`);

  const dir = await mkdtemp(join(tmpdir(), 'bench-adaptive-'));
  // before the link: a machine without a cgroup cpu controller fails here, with nothing to undo
  const groups = hogGroup === 'tenant' && scenarios.some((s) => s.hogAfterSeconds !== undefined) ? createCpuGroups({ handoff: 1, hog: hogWeight }) : undefined;
  const link = createShapedLink(scenarios[0]!.startMbit * 1e6);
  const stop = (): void => {
    stopRunning?.();
    link.destroy();
    groups?.destroy();
    process.exit(130);
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  try {
    const generate = async (name: string, memory: string, disk: string): Promise<ImageSet> => generateImageSet({ dir: join(dir, name), memoryBytes: parseSizeBytes(memory), diskBytes: parseSizeBytes(disk), content });
    // only the VMs the chosen scenarios move
    const imagesOf: Partial<Record<Scenario['vm'], ImageSet>> = {};
    if (scenarios.some((s) => s.vm === 'fixed')) imagesOf.fixed = await generate('vm', values['memory-size']!, values['disk-size']!);
    if (scenarios.some((s) => s.vm === 'phased')) imagesOf.phased = await generate('vm-phased', values['phased-size']!, values['phased-size']!);
    const runs: Run[] = [];
    for (const s of scenarios) {
      for (let rep = 0; rep < repeat; rep++) {
        for (const c of candidates) {
          const r = await handoff(link, imagesOf, dir, c, s, rep, cpus, hogGroup, groups);
          runs.push(r);
          const phases = r.phases?.map((p) => `${p.label} ${(p.inputBps / 1e6).toFixed(2)} MB/s`).join(', ');
          process.stderr.write(`${s.name} ${c.name} #${rep + 1}: ${r.handoffSeconds.toFixed(2)} s, transfer ${r.transferSeconds.toFixed(2)} s, source CPU ${r.sourceCpuSeconds.toFixed(2)} s${r.hogCoreShare === undefined ? '' : `, hog ${r.hogCoreShare.toFixed(2)} of a core`}, wire ${(r.wireBytes / 1e6).toFixed(2)} MB${phases ? ` (${phases})` : ''}${r.switches ? `, ${r.switches} switches` : ''}${r.verified ? '' : ' NOT VERIFIED'}\n`);
          for (const d of r.decisions ?? []) process.stderr.write(`    ${d}\n`);
        }
      }
    }
    /** the median run of each scenario and mode by `seconds`: what a table (and, by handoff time, the plot) shows */
    const mediansBy = (seconds: (r: Run) => number): Run[] =>
      scenarios.flatMap((s) =>
        candidates.map((c) => {
          const these = runs.filter((r) => r.scenario === s.name && r.mode === c.name).sort((a, b) => seconds(a) - seconds(b));
          return these[Math.floor((these.length - 1) / 2)]!;
        }),
      );
    /**
     * `best`: what picks the best static mode (default what the table shows). With `worstRow`, a last
     * row holds each mode's largest ratio to the scenario's best static mode: what choosing that
     * mode costs where the bandwidth and load are not known beforehand.
     */
    const tableOf = (seconds: (r: Run) => number, best = seconds, worstRow = false): string[][] => {
      const medians = mediansBy(seconds);
      const bestMedians = best === seconds ? medians : mediansBy(best);
      const rows = [['scenario', ...modes, 'best static', 'adaptive / best']];
      const worst = new Map<string, number>();
      for (const s of scenarios) {
        const these = medians.filter((r) => r.scenario === s.name);
        const statics = bestMedians.filter((r) => r.scenario === s.name && r.mode !== 'adaptive');
        const bestMode = statics.length > 0 ? statics.reduce((a, b) => (best(b) < best(a) ? b : a)).mode : undefined;
        const bestStatic = these.find((r) => r.mode === bestMode);
        const adaptive = these.find((r) => r.mode === 'adaptive');
        const ratio = adaptive && bestStatic ? (seconds(adaptive) / seconds(bestStatic)).toFixed(3) : '-';
        rows.push([s.name, ...these.map((r) => seconds(r).toFixed(2)), bestStatic?.mode ?? '-', ratio]);
        if (bestStatic) for (const r of these) worst.set(r.mode, Math.max(worst.get(r.mode) ?? 0, seconds(r) / seconds(bestStatic)));
      }
      if (worstRow && scenarios.length > 1) rows.push(['worst / best static', ...modes.map((m) => worst.get(m)?.toFixed(3) ?? '-'), '', '']);
      return rows;
    };
    const reports = scenarios.flatMap((s) => phaseReport(s, runs, modes) ?? []);
    // the plot is of the fixed bandwidths
    const plotted = scenarios.some((s) => s.vm === 'fixed');
    if (plotted) await writeFile(values.svg!, svgPlot(mediansBy((r) => r.handoffSeconds), bandwidths));
    const unverified = runs.filter((r) => !r.verified).length;
    const medianOf = `median of ${repeat}`;
    const everyRun = JSON.stringify({ repeat, content, sourceCpus: cpus.sourceCpus, runs, phased: reports });
    if (values['json-out']) await writeFile(values['json-out'], everyRun);
    if (values.json) console.log(everyRun);
    else {
      const where = cpus.source.length ? `source on ${cpus.sourceCpus} of ${availableParallelism()} cores, destination on the rest` : `both cloudlets on all ${availableParallelism()} cores`;
      console.log(`handoff time in seconds, ${medianOf} (shaped link between two network namespaces; ${where})${unverified ? `; ${unverified} runs NOT VERIFIED` : ''}`);
      console.log(formatTable(tableOf((r) => r.handoffSeconds, undefined, true)));
      // the actors' start-up (the same work in every mode) varies between runs by more than the
      // modes differ on a fast link; from the accept on, the runs differ by mode
      console.log(`\ntransfer time in seconds (the destination's accept to its verified result), ${medianOf}`);
      console.log(formatTable(tableOf((r) => r.transferSeconds, undefined, true)));
      // where the link is not the bottleneck, what each mode costs the source's cores decides; its
      // CPU seconds vary less between runs than wall time on a shared machine
      console.log(`\nsource CPU seconds (its command, actors and nats-server, start-up included), ${medianOf}; best static by transfer time`);
      console.log(formatTable(tableOf((r) => r.sourceCpuSeconds, (r) => r.transferSeconds)));
      if (reports.length) {
        console.log(`\nMB/s of dirty input moved in each phase (the link's bytes in the phase at the run's input/wire ratio), ${medianOf}`);
        console.log(formatTable(phaseTable(reports, modes)));
        console.log(`\noracle bound: the transfer had each phase gone at its best static mode's rate from its start (transfer times, ${medianOf})`);
        console.log(formatTable(oracleTable(reports)));
      }
      if (plotted) console.log(`plot: ${values.svg}`);
    }
  } finally {
    link.destroy();
    groups?.destroy();
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
