/**
 * CPU time of the calling thread, from /proc/thread-self/schedstat (nanoseconds on the CPU, exact).
 * `process.cpuUsage()` is the whole process's: in a compress worker it mixes the codec's thread
 * with the bus and message handling of the main one, and Node 20 has no per-thread figure.
 */
import { readFileSync } from 'node:fs';

/** field `i` of /proc/thread-self/schedstat in ms, or undefined where /proc does not say (not Linux, no schedstat) */
function schedstatMs(i: 0 | 1): number | undefined {
  try {
    const ns = Number(readFileSync('/proc/thread-self/schedstat', 'utf8').split(' ')[i]);
    return Number.isFinite(ns) ? ns / 1e6 : undefined;
  } catch {
    return undefined;
  }
}

/** ms this thread has run */
export function threadCpuMs(): number | undefined {
  return schedstatMs(0);
}

/**
 * ms this thread has waited for a core, runnable but not running (the second field, see the
 * kernel's sched-stats.rst): where it waited long, its own pace was the cores', not its work's
 */
export function runQueueWaitMs(): number | undefined {
  return schedstatMs(1);
}
