/** Benchmark plumbing: waiting for a stage to drain its input, the CPU its processes used. */
import { readFileSync, readdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import type { Bus } from '../../shared/bus.js';
import { TICKS_PER_SECOND, parseProcStat } from '../../shared/proc-stat.js';

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
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (parseProcStat(readFileSync(`/proc/${entry}/stat`, 'utf8')).ppid === pid) children.push(Number(entry));
    } catch {
      // it ended meanwhile
    }
  }
  return children;
}

/**
 * SIGTERM to `pid` and its children: a command stopped with what it started, nats-server too (an
 * actor would stop on its own once its command is gone; a nats-server would not). Not by process
 * group: a command in a session of its own is a scheduling group of its own (autogroup), and a
 * CPU hog outside it then took half the core from the whole handoff, not a task's share.
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
