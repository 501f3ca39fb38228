/**
 * When to stop pre-copy (pure, so it is unit-tested on given histories). After each round: the next
 * round would carry the pages dirtied while this one ran, at the rate the pipeline delivered this
 * one; stop-and-copy when that is predicted to fit the downtime target, when rounds stop shrinking
 * (the guest dirties as fast as we send: more rounds only cost time), or at the round limit.
 */
export interface RoundStat {
  round: number;
  dirtyPages: number;
  /** capture start to everything delivered at the destination */
  seconds: number;
}

export interface RoundPolicy {
  downtimeMs: number;
  maxRounds: number;
  /** fixed costs of the stop: device state, the final scan, resuming at the destination */
  overheadMs?: number;
}

export interface RoundDecision {
  final: boolean;
  reason: string;
  predictedDowntimeMs: number;
}

export function decideAfterRound(history: readonly RoundStat[], policy: RoundPolicy): RoundDecision {
  const last = history.at(-1);
  if (!last) return { final: false, reason: 'no round yet', predictedDowntimeMs: Infinity };
  const overheadMs = policy.overheadMs ?? 0;
  // delivery rate of the last round (pages/s); a round with nothing to send was immediate
  const pagesPerSecond = last.dirtyPages > 0 && last.seconds > 0 ? last.dirtyPages / last.seconds : Infinity;
  // pages dirtied per second while the round before ran (what the last round found)
  const before = history.at(-2);
  const dirtyPerSecond = before && before.seconds > 0 ? last.dirtyPages / before.seconds : undefined;
  const nextPages = dirtyPerSecond === undefined ? last.dirtyPages : dirtyPerSecond * last.seconds;
  const predictedDowntimeMs = overheadMs + (nextPages / pagesPerSecond) * 1000;
  if (last.dirtyPages === 0) return { final: true, reason: 'nothing dirty: stop now', predictedDowntimeMs: overheadMs };
  if (predictedDowntimeMs <= policy.downtimeMs) return { final: true, reason: `predicted downtime ${Math.round(predictedDowntimeMs)} ms fits ${policy.downtimeMs} ms`, predictedDowntimeMs };
  if (history.length >= policy.maxRounds) return { final: true, reason: `round limit ${policy.maxRounds}`, predictedDowntimeMs };
  if (before && last.dirtyPages >= before.dirtyPages * 0.9) return { final: true, reason: `rounds stopped shrinking (${before.dirtyPages} -> ${last.dirtyPages} pages)`, predictedDowntimeMs };
  return { final: false, reason: `predicted downtime ${Math.round(predictedDowntimeMs)} ms: another round`, predictedDowntimeMs };
}
