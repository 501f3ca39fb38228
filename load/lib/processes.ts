/** Benchmark plumbing: waiting for a stage to drain its input, the CPU its processes used. */
import { readFile } from 'node:fs/promises';
import type { Bus } from '../../shared/bus.js';

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
 * Linux counts them in ticks of 1/100 s (USER_HZ, the same on every architecture's /proc).
 */
export async function endedChildrenCpuSeconds(): Promise<number> {
  const stat = await readFile('/proc/self/stat', 'utf8');
  // fields after the command's closing parenthesis start at field 3 (state); cutime and cstime are 16 and 17
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[16 - 3]) + Number(fields[17 - 3])) / 100;
}
