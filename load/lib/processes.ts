/** Benchmark plumbing: waiting for a stage to drain its input, the CPU its processes used, a CPU hog. */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import type { Bus } from '../../shared/bus/bus.js';
import { TICKS_PER_SECOND, parseProcStat, readProcStat } from '../../shared/cpu/proc-stat.js';

export async function waitDrained(bus: Bus, stream: string, durable: string, timeoutMs = 600_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const info = await bus.jsm.consumers.info(stream, durable);
      if (info.num_pending === 0 && info.num_ack_pending === 0 && info.delivered.stream_seq > 0) return;
    } catch {
      // the stage has not created its consumer yet
    }
    if (Date.now() > deadline) throw new Error(`${stream}/${durable} did not drain in time`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * CPU seconds of this process's children that have ended and been waited for, with theirs
 * (/proc/self/stat cutime + cstime): read before and after a child's exit, what that child's tree used.
 */
export async function endedChildrenCpuSeconds(): Promise<number> {
  const stat = parseProcStat(await readFile('/proc/self/stat', 'utf8'));
  return (stat.cutimeTicks + stat.cstimeTicks) / TICKS_PER_SECOND;
}

/** The processes whose parent is `pid` (from /proc): a command's actors and nats-server. */
export function childrenOf(pid: number): number[] {
  const children: number[] = [];
  for (const entry of readdirSync('/proc')) {
    // one that ended meanwhile has no stat
    if (/^\d+$/.test(entry) && readProcStat(entry)?.ppid === pid) children.push(Number(entry));
  }
  return children;
}

/**
 * SIGTERM to `pid` and its children: a command stopped with what it started, nats-server too (an
 * actor would stop on its own once its command is gone; a nats-server would not). Not by process
 * group: a command in a session of its own is a scheduling group of its own (autogroup), and a
 * CPU hog outside it then takes half the core from the whole handoff, not a task's share.
 */
export function stopWithChildren(pid: number | undefined): void {
  if (pid === undefined) return;
  for (const p of [...childrenOf(pid), pid]) {
    try {
      process.kill(p, 'SIGTERM');
    } catch {
      // ended already
    }
  }
}

/**
 * A CPU hog (a process spinning on one core), started now and stopped by itself once it runs
 * (node's start-up takes CPU from whatever runs then): `SIGCONT` sets it spinning. `ownGroup`: a
 * session, so a scheduling group (autogroup) of its own.
 */
export async function stoppedHog(prefix: readonly string[], ownGroup: boolean): Promise<ChildProcess> {
  const [command, ...args] = [...prefix, process.execPath, '-e', "process.kill(process.pid, 'SIGSTOP'); for (;;) {}"];
  const hog = spawn(command!, args, { stdio: 'ignore', detached: ownGroup });
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (hog.exitCode !== null || hog.signalCode !== null) throw new Error(`the CPU hog ended before it stopped itself (${hog.exitCode ?? hog.signalCode})`);
    if (readProcStat(hog.pid)?.state === 'T') return hog;
    if (Date.now() > deadline) {
      hog.kill('SIGKILL');
      throw new Error('the CPU hog did not stop itself within 30 s');
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** CPU seconds a process has taken so far (utime + stime); undefined once it is gone */
export function cpuSecondsOf(pid: number | undefined): number | undefined {
  const stat = readProcStat(pid);
  return stat && (stat.utimeTicks + stat.stimeTicks) / TICKS_PER_SECOND;
}
