/**
 * Spare CPU, measured rather than assumed: the busy time of the cores this handoff may run on
 * (its CPU affinity; all of the machine's unless pinned) from /proc/stat, minus the time of the
 * handoff's own processes (its actors and nats-server) pinned alike, over the last interval.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
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

/**
 * utime + stime of this workload's processes (node processes running `handoff`, and nats-server)
 * that may run where this one may: a process pinned elsewhere (a destination on the same machine,
 * in a benchmark) does not take these cores.
 */
function ownJiffies(cpuList: string | undefined): number {
  let sum = 0;
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if (!cmd.includes('nats-server') && !/handoff|cli\/main\.js/.test(cmd)) continue;
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
