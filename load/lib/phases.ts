/**
 * A scenario in phases (bandwidth or CPU changing mid-handoff): what each run moved in each phase,
 * from the link's byte counter read at the phase boundaries, and the oracle bound, the transfer
 * time of a tuner that used each phase's best static mode from the phase's first byte.
 */

export interface Phase {
  label: string;
  /** seconds from the destination's accept */
  startSeconds: number;
}

/** the link's counter (bytes the source sent) at a moment of the run, seconds from the accept */
export interface LinkSample {
  atSeconds: number;
  sentBytes: number;
}

export interface PhaseProgress {
  label: string;
  seconds: number;
  wireBytes: number;
  /** dirty input moved in the phase: its wire bytes at the run's own input/wire ratio */
  inputBytes: number;
  inputBps: number;
}

/**
 * Each phase's share of a run, from the link's counter read as each phase began (`starts`, the
 * first at the accept) and at the run's end. A phase that began after the end is left out; the last
 * one reached ends with the run.
 */
export function phaseProgress(phases: readonly Phase[], starts: readonly LinkSample[], end: LinkSample, inputBytes: number): PhaseProgress[] {
  const first = starts[0];
  if (!first || end.sentBytes <= first.sentBytes) return [];
  const inputPerWire = inputBytes / (end.sentBytes - first.sentBytes);
  const out: PhaseProgress[] = [];
  for (let i = 0; i < phases.length && i < starts.length; i++) {
    const from = starts[i]!;
    if (from.atSeconds >= end.atSeconds) break;
    const next = starts[i + 1];
    const to = next && next.atSeconds < end.atSeconds ? next : end;
    const seconds = to.atSeconds - from.atSeconds;
    const wireBytes = to.sentBytes - from.sentBytes;
    const moved = wireBytes * inputPerWire;
    out.push({ label: phases[i]!.label, seconds: Number(seconds.toFixed(3)), wireBytes, inputBytes: Math.round(moved), inputBps: seconds > 0 ? moved / seconds : 0 });
  }
  return out;
}

/**
 * The transfer time had each phase gone at `inputBps[i]` (bytes of dirty input a second) from its
 * start: `inputBytes` moved through phases that start at `phases[i].startSeconds`, the last without end.
 */
export function oracleSeconds(phases: readonly Phase[], inputBps: readonly number[], inputBytes: number): number {
  let left = inputBytes;
  for (let i = 0; i < phases.length; i++) {
    const rate = inputBps[i] ?? 0;
    const start = phases[i]!.startSeconds;
    const next = phases[i + 1]?.startSeconds;
    if (next === undefined || rate * (next - start) >= left) {
      if (rate <= 0) return Infinity;
      return start + left / rate;
    }
    left -= rate * (next - start);
  }
  return Infinity;
}
