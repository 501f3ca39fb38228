/**
 * CPU time of the calling thread, from /proc/thread-self/schedstat (nanoseconds on the CPU, exact).
 * `process.cpuUsage()` is the whole process's: in a compress worker it mixes the codec's thread
 * with the bus and message handling of the main one, and Node 20 has no per-thread figure.
 */
import { readFileSync } from 'node:fs';

/** ms this thread has run, or undefined where /proc does not say (not Linux, no schedstat) */
export function threadCpuMs(): number | undefined {
  try {
    const ns = Number(readFileSync('/proc/thread-self/schedstat', 'utf8').split(' ')[0]);
    return Number.isFinite(ns) ? ns / 1e6 : undefined;
  } catch {
    return undefined;
  }
}
