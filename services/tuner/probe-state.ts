/** Where a migration's ratio probe stands: what the tuner's looks read and RatioProbes (probes.ts) moves on. */
import type { ProbePlan } from './probe.js';

/** A ratio probe under way: what settles when its ratios are in (or it failed), and what stops it where it runs in this process. */
export interface ProbeRun {
  done: Promise<void>;
  here?: AbortController;
}

/**
 * Where a migration's ratio probe stands, one state at a time:
 * - `first-look`: the first look has not yet said what to do about it;
 * - `put-off`: the first look decided without it; it starts at a look past `dueMs` that finds the
 *   link the bottleneck (putOffProbeStarts);
 * - `awaited`: the first look waits for it (other looks skip meanwhile);
 * - `running`: later looks go on without it;
 * - `over`: its ratios are in use, or it failed, found too few changed pages, or had no image.
 */
export type ProbeState =
  | { phase: 'first-look' }
  | { phase: 'put-off'; plan: ProbePlan; dueMs: number }
  | { phase: 'awaited'; run: ProbeRun }
  | { phase: 'running'; run: ProbeRun }
  | { phase: 'over' };
