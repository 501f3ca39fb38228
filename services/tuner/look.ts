/**
 * The tuner's per-migration follow state and the pure parts of a look at it: when a look is due,
 * what the first look does about the ratio probe, and what a look records, writes and logs. No bus,
 * no timers: the service (service.ts) reads the clock and does what these say.
 */
import type { TunerDecision } from '../../shared/model/migration.js';
import { formatMode, type Mode, type ModeConfig } from '../../shared/model/mode.js';
import type { TunerConfig } from './config.js';
import { linkBandwidthBps } from './estimator.js';
import { modeKey, pick, softMin, type Conditions, type Prediction, type Profile } from './model.js';
import { clearlyLinkBound, startModeNearBest, type Decision } from './policy.js';
import { probePlan, type ProbePlan } from './probe.js';
import type { ProbeState } from './probe-state.js';
import { Tuner } from './tuner.js';

/** One adaptive migration the tuner follows. */
export interface Followed {
  tuner: Tuner;
  startedMs: number;
  /** the sender's figure from ACKs (0 until it has one) */
  measuredBandwidthBps: number;
  /** the sender's probe of the link before chunks flowed */
  probedBandwidthBps: number;
  /** share of the last interval the sender found the link the bottleneck (undefined: not yet measured) */
  linkBoundShare?: number;
  lastStatsMs: number;
  /** the config last written (the mode and the compression for other deltas) */
  configWritten?: string;
  /** when the tuner saw the destination accept (undefined: it came later) */
  acceptedAtMs?: number;
  /** where the migration's ratio probe stands (see ProbeState) */
  probe: ProbeState;
  /** the bandwidth the last look took, and when it was */
  lookedAt?: { bandwidthBps: number; atMs: number };
}

export function newFollowed(profile: Profile, config: TunerConfig, nowMs: number): Followed {
  return { tuner: new Tuner(profile, config), startedMs: nowMs, measuredBandwidthBps: 0, probedBandwidthBps: 0, lastStatsMs: nowMs, probe: { phase: 'first-look' } };
}

/** the link's speed as the tuner takes it (see linkBandwidthBps) */
export function bandwidthOf(f: Followed): number {
  return linkBandwidthBps(f.measuredBandwidthBps, f.probedBandwidthBps, f.linkBoundShare, f.tuner.config);
}

/** Whether the link's speed has moved far enough from the last look's, long enough after it, for a look at once. */
export function bandwidthMoved(f: Followed, nowMs: number): boolean {
  const last = f.lookedAt;
  if (!last) return false;
  const nowBps = bandwidthOf(f);
  const factor = Math.max(nowBps / last.bandwidthBps, last.bandwidthBps / nowBps);
  return factor >= f.tuner.config.bandwidthChangeFactor && nowMs - last.atMs >= f.tuner.config.minLookGapMs;
}

/** What the first look does about the ratio probe of `plan`: wait for it, or put it off. */
export interface FirstLookProbe {
  plan: ProbePlan;
  wait: boolean;
}

/**
 * Ratios decide only where the link is the bottleneck, by a margin (this look prices the modes on
 * the profile's costs, and a link probe that misread the link by a few percent passed for one).
 * There, with the start mode far from the best, the first look waits for the probe of the modes
 * that could win (the costly ones only where they could win even with a ratio a fifth better than
 * thought): on the profile's ratios it chose modes that held the link back, and switching later
 * took more looks. With the start mode near the best it decides at once and the probe comes later.
 * Where the cores are the bottleneck the probe is put off too, and leaves them to the pipeline.
 */
export function firstLookProbe(tuner: Tuner, profile: Profile, conditions: Conditions, start: Mode): FirstLookProbe {
  const { config } = tuner;
  const predicted = tuner.predictNow(conditions);
  const best = pick(predicted, config);
  if (!clearlyLinkBound(best, config)) return { plan: probePlan(profile), wait: false };
  const couldWin = new Set(
    predicted.filter((p) => best && softMin(p.processingBlocksPerSec, p.networkBlocksPerSec / config.costlyRatioDoubt) > best.blocksPerSec).map((p) => modeKey(p.mode)),
  );
  const plan = probePlan(profile, (m) => couldWin.has(modeKey(m)));
  return { plan, wait: !startModeNearBest(predicted.find((p) => modeKey(p.mode) === modeKey(start)), best, config) };
}

/** seconds from `fromMs` to `toMs`, as a look's record shows them */
export function secondsBetween(fromMs: number, toMs: number): number {
  return Number(((toMs - fromMs) / 1000).toFixed(2));
}

/**
 * The config a look writes: the mode, and the compression for chunks of other deltas, which follows
 * the conditions between switches too (chunks queued at compress under an earlier mode's delta).
 */
export function configOf(mode: Mode, compressFor: ModeConfig['compressFor'] | undefined): string {
  return JSON.stringify({ ...mode, compressFor: compressFor ?? {} } satisfies ModeConfig);
}

/** What a look at `f` (at `nowMs`) found, for the `tuned` event: from `from` to `mode` (the same where it stays). */
export function tunedRecord(
  f: Followed,
  nowMs: number,
  from: Mode,
  mode: Mode,
  c: Conditions,
  decision: Decision | undefined,
  compressWorkersInUse: number,
  probeWaitSeconds: number | undefined,
): TunerDecision {
  return {
    atSeconds: secondsBetween(f.startedMs, nowMs),
    from: formatMode(from),
    to: formatMode(mode),
    bandwidthBps: Math.round(c.bandwidthBps),
    measuredBandwidthBps: Math.round(f.measuredBandwidthBps),
    ...(f.probedBandwidthBps > 0 ? { probedBandwidthBps: Math.round(f.probedBandwidthBps) } : {}),
    spareCores: Number(c.spareCores.toFixed(2)),
    compressWorkers: c.compressWorkers,
    predictedCurrentBlocksPerSec: Math.round(decision?.currentBlocksPerSec ?? 0),
    predictedChosenBlocksPerSec: Math.round(decision?.chosenBlocksPerSec ?? 0),
    ...(probeWaitSeconds !== undefined ? { probeWaitSeconds } : {}),
    compressWorkersInUse,
    overheadCpuMsPerBlock: Number(f.tuner.estimator.overheadCpuMsPerBlock.toFixed(4)),
  };
}

/** The debug log of a look: what it predicted for the current mode and the best three, and what they cost. */
export function lookLogFields(f: Followed, nowMs: number, current: Mode, conditions: Conditions): Record<string, unknown> {
  const look = f.tuner.lastLook;
  const shown = (p: Prediction): string => `${formatMode(p.mode)} ${Math.round(p.processingBlocksPerSec)}/${Math.round(p.networkBlocksPerSec)}`;
  return {
    atSeconds: secondsBetween(f.startedMs, nowMs),
    bandwidthBps: Math.round(conditions.bandwidthBps),
    measuredBandwidthBps: Math.round(f.measuredBandwidthBps),
    linkBoundShare: f.linkBoundShare,
    spareCores: Number(conditions.spareCores.toFixed(2)),
    fixedCpuMsPerBlock: Number((look?.fixedCpuMsPerBlock ?? 0).toFixed(4)),
    overheadCpuMsPerBlock: Number((look?.overheadCpuMsPerBlock ?? 0).toFixed(4)),
    // blocks/s each could process / the link could carry
    current: look?.current ? shown(look.current) : '-',
    top: look?.top.map(shown).join(', ') ?? '-',
    // CPU ms a block of the current mode and the top three: delta + compress + unreported
    costs: f.tuner.estimator
      .costs()
      .filter((c) => [current, ...(look?.top.map((p) => p.mode) ?? [])].some((m) => modeKey(m) === modeKey(c.mode)))
      .map((c) => `${formatMode(c.mode)} ${c.deltaCpuMsPerBlock.toFixed(3)}+${c.compressCpuMsPerBlock.toFixed(3)}+${(c.overheadCpuMsPerBlock ?? 0).toFixed(3)}`)
      .join(', '),
  };
}
