/**
 * CPU per chunk for a stage that works on several chunks at once. `process.cpuUsage()` covers the
 * whole process (a compress worker's thread included), so a chunk waiting beside another one would
 * count the other's CPU as well: a chunk's share runs from when it started or the last chunk
 * finished, whichever came later, and no CPU is counted twice (counted per chunk from its start,
 * two chunks in flight each reported about twice their cost).
 */
export class CpuAccount {
  private countedToMs: number;

  /** `nowMs`: the process's CPU so far, in ms */
  constructor(private readonly nowMs: () => number = processCpuMs) {
    this.countedToMs = nowMs();
  }

  /** where a chunk's share may begin: pass it to `finish` */
  start(): number {
    return this.nowMs();
  }

  /** the CPU ms to count for the chunk started at `startedMs`, which has just finished */
  finish(startedMs: number): number {
    const now = this.nowMs();
    const from = Math.max(startedMs, this.countedToMs);
    this.countedToMs = now;
    return Math.max(0, now - from);
  }
}

function processCpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}
