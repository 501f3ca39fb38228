/**
 * Spare CPU, measured rather than assumed: the machine's busy time from /proc/stat minus the time of
 * the handoff's own processes (its actors and nats-server), over the last interval.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';


/** /proc counts CPU in USER_HZ ticks: 100 a second on every Linux architecture Node runs on */
const MS_PER_TICK = 10;

function machineJiffies(): { busy: number; total: number } {
  const cpu = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!.trim().split(/\s+/).slice(1).map(Number);
  const idle = (cpu[3] ?? 0) + (cpu[4] ?? 0);
  const total = cpu.slice(0, 8).reduce((a, b) => a + b, 0);
  return { busy: total - idle, total };
}

/** utime + stime of this workload's processes: node processes running `handoff`, and nats-server. */
function ownJiffies(): number {
  let sum = 0;
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if (!cmd.includes('nats-server') && !/handoff|cli\/main\.js/.test(cmd)) continue;
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      sum += Number(fields[11]) + Number(fields[12]);
    } catch {
      // the process ended meanwhile
    }
  }
  return sum;
}

export class CpuSampler {
  readonly cores = availableParallelism();
  private last: { machine: { busy: number; total: number }; own: number } | undefined;
  /** cores taken by other work in the last interval */
  otherBusyCores = 0;
  /** CPU ms the handoff's own processes took in the last interval */
  ownCpuMs = 0;

  /** Call every second or so; returns the cores this workload may use now. */
  sample(): number {
    let machine: { busy: number; total: number };
    try {
      machine = machineJiffies();
    } catch {
      return this.cores; // no /proc: assume the machine is ours
    }
    const own = ownJiffies();
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
