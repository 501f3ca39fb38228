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
 * Each phase's share of a run, from link samples taken at the accept, at each phase's start and at
 * the end. A phase the run did not reach is left out; the last one ends with the run.
 */
export function phaseProgress(phases: readonly Phase[], samples: readonly LinkSample[], endSeconds: number, inputBytes: number): PhaseProgress[] {
  const sorted = [...samples].sort((a, b) => a.atSeconds - b.atSeconds);
  const first = sorted[0];
  const last = sorted.at(-1);
  if (!first || !last || last.sentBytes <= first.sentBytes) return [];
  const inputPerWire = inputBytes / (last.sentBytes - first.sentBytes);
  /** the counter at `t`: the newest sample taken by then */
  const at = (t: number): number => sorted.filter((s) => s.atSeconds <= t + 1e-9).at(-1)?.sentBytes ?? first.sentBytes;
  const out: PhaseProgress[] = [];
  phases.forEach((p, i) => {
    if (p.startSeconds >= endSeconds) return;
    const end = Math.min(phases[i + 1]?.startSeconds ?? endSeconds, endSeconds);
    const seconds = end - p.startSeconds;
    const wireBytes = (i + 1 < phases.length && end < endSeconds ? at(end) : last.sentBytes) - at(p.startSeconds);
    const moved = wireBytes * inputPerWire;
    out.push({ label: p.label, seconds: Number(seconds.toFixed(3)), wireBytes, inputBytes: Math.round(moved), inputBps: seconds > 0 ? moved / seconds : 0 });
  });
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
