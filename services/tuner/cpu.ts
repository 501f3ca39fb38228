/**
 * Spare CPU, measured rather than assumed: the busy time of the cores this handoff may run on
 * (its CPU affinity; all of the machine's unless pinned) from /proc/stat, minus the time of the
 * handoff's own processes (its actors and nats-server, see ownProcesses) pinned alike, over the
 * last interval.
 */
import { readdirSync, readFileSync, readlinkSync, realpathSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { basename, join, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { TICKS_PER_SECOND, readProcStat } from '../../shared/cpu/proc-stat.js';

const MS_PER_TICK = 1000 / TICKS_PER_SECOND;

/** The CPUs of a `Cpus_allowed_list` such as "0-3,6". */
export function parseCpuList(text: string): number[] {
  const cpus: number[] = [];
  for (const part of text.trim().split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    if (!m) throw new Error(`CPU list ${JSON.stringify(text)}: cannot read ${JSON.stringify(part)}`);
    for (let c = Number(m[1]); c <= Number(m[2] ?? m[1]); c++) cpus.push(c);
  }
  return cpus;
}

/**
 * Busy and total ticks in /proc/stat's text, of the given CPUs (their `cpuN` lines), or of the
 * whole machine (the `cpu` line) when none are given.
 */
export function cpuJiffies(procStat: string, cpus?: readonly number[]): { busy: number; total: number } {
  const wanted = cpus ? new Set(cpus.map((c) => `cpu${c}`)) : new Set(['cpu']);
  let busy = 0;
  let total = 0;
  for (const line of procStat.split('\n')) {
    const [name, ...fields] = line.trim().split(/\s+/);
    if (!name || !wanted.has(name)) continue;
    const ticks = fields.map(Number);
    const lineTotal = ticks.slice(0, 8).reduce((a, b) => a + b, 0);
    total += lineTotal;
    busy += lineTotal - (ticks[3] ?? 0) - (ticks[4] ?? 0);
  }
  return { busy, total };
}

function allowedCpuList(pid: string): string | undefined {
  return /^Cpus_allowed_list:\s*(\S+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
}

/** A process as /proc shows it: what tells whether it is this handoff's own. */
export interface ProcessInfo {
  pid: string;
  ppid: number;
  /** its command line, one argument each (argv[0] first) */
  argv: string[];
  /** its working directory, against which a relative script path is resolved */
  cwd: string;
}

/** `path` with its links resolved, where it exists */
function realPath(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}

/** This checkout: services/tuner/cpu.js runs from its dist/. */
export const CHECKOUT_ROOT = realPath(fileURLToPath(new URL('../../../', import.meta.url)));

/**
 * Which of `processes` are this handoff's own: node processes running this checkout's CLI
 * (dist/cli/main.js: its actors, a command; or bin/handoff.js), and the nats-servers that a
 * process running this checkout's code started (a command's embedded server, a test's). Another
 * checkout's handoff, or any other program whose command line says "handoff", is not. A script's
 * path is resolved against the process's directory, then by `resolveLinks`.
 */
export function ownProcesses(processes: readonly ProcessInfo[], root: string = CHECKOUT_ROOT, resolveLinks: (path: string) => string = realPath): Set<string> {
  const dist = join(root, 'dist') + sep;
  const entries = new Set([join(root, 'dist', 'cli', 'main.js'), join(root, 'bin', 'handoff.js')]);
  const own = new Set<string>();
  const runsCheckout = new Set<number>();
  for (const p of processes) {
    const scripts = p.argv.slice(1).filter((a) => !a.startsWith('-') && a.endsWith('.js')).map((a) => resolveLinks(resolve(p.cwd, a)));
    if (scripts.some((s) => s.startsWith(dist) || entries.has(s))) runsCheckout.add(Number(p.pid));
    if (scripts.some((s) => entries.has(s))) own.add(p.pid);
  }
  for (const p of processes) if (basename(p.argv[0] ?? '') === 'nats-server' && runsCheckout.has(p.ppid)) own.add(p.pid);
  return own;
}

/**
 * The process `pid` from /proc, where it may be one of ours (it runs a script or nats-server: the
 * others' directories are not read); undefined where not, or where it ended meanwhile.
 */
function processInfo(pid: string): ProcessInfo | undefined {
  try {
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    if (!cmdline.includes('.js') && !cmdline.includes('nats-server')) return undefined;
    const argv = cmdline.split('\0').filter(Boolean);
    const stat = readProcStat(pid);
    if (!stat) return undefined;
    return { pid, ppid: stat.ppid, argv, cwd: readlinkSync(`/proc/${pid}/cwd`) };
  } catch {
    return undefined;
  }
}

/**
 * utime + stime of this workload's processes (see ownProcesses) that may run where this one may: a
 * process pinned elsewhere (a destination on the same machine, in a benchmark) does not take these cores.
 */
function ownJiffies(cpuList: string | undefined): number {
  const processes: ProcessInfo[] = [];
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const info = processInfo(pid);
    if (info) processes.push(info);
  }
  let sum = 0;
  for (const pid of ownProcesses(processes)) {
    try {
      if (cpuList !== undefined && allowedCpuList(pid) !== cpuList) continue;
      const stat = readProcStat(pid);
      if (stat) sum += stat.utimeTicks + stat.stimeTicks;
    } catch {
      // the process ended meanwhile
    }
  }
  return sum;
}

export class CpuSampler {
  /** the cores this process may run on (its affinity), counted */
  readonly cores = availableParallelism();
  private readonly cpuList = ((): { text: string; cpus: number[] } | undefined => {
    try {
      const text = allowedCpuList('self');
      return text === undefined ? undefined : { text, cpus: parseCpuList(text) };
    } catch {
      return undefined; // no /proc: the whole machine
    }
  })();
  private last: { machine: { busy: number; total: number }; own: number } | undefined;
  /** cores taken by other work in the last interval */
  otherBusyCores = 0;
  /** CPU ms the handoff's own processes took in the last interval */
  ownCpuMs = 0;

  /** Call every second or so; returns the cores this workload may use now. */
  sample(): number {
    let machine: { busy: number; total: number };
    try {
      machine = cpuJiffies(readFileSync('/proc/stat', 'utf8'), this.cpuList?.cpus);
    } catch {
      return this.cores; // no /proc: assume the machine is ours
    }
    const own = ownJiffies(this.cpuList?.text);
    if (this.last) {
      const total = machine.total - this.last.machine.total;
      if (total > 0) {
        const otherJiffies = Math.max(0, machine.busy - this.last.machine.busy - (own - this.last.own));
        this.otherBusyCores = (otherJiffies / total) * this.cores;
      }
      this.ownCpuMs = Math.max(0, own - this.last.own) * MS_PER_TICK;
    }
    this.last = { machine, own };
    return Math.max(0.1, this.cores - this.otherBusyCores);
  }
}
