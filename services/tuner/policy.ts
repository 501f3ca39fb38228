/**
 * The tuner's policy, pure: a migration's policy state, the estimator's estimates and the conditions
 * in, a decision and the next state out. It switches when another mode's predicted throughput beats
 * the current one by enough (the hysteresis), for long enough (confirmations), and says how many
 * of the running compress workers the mode needs.
 */
import { DELTA_ALGORITHMS, type Mode, type ModeConfig } from '../../shared/model/mode.js';
import type { TunerConfig } from './config.js';
import type { Estimates } from './estimator.js';
import { modeKey, pick, predict, rank, type Conditions, type Prediction } from './model.js';

/** What the policy remembers of a migration between looks. */
export interface PolicyState {
  /** looks done */
  looks: number;
  /** consecutive looks that found the current mode beaten by more than the hysteresis */
  beatenLooks: number;
  /** compress workers in use (undefined before the first count: all of them) */
  workersInUse?: number;
  /** consecutive looks that found fewer workers enough */
  fewerLooks: number;
}

export const INITIAL_POLICY_STATE: Readonly<PolicyState> = { looks: 0, beatenLooks: 0, fewerLooks: 0 };

export type CompressFor = NonNullable<ModeConfig['compressFor']>;

/** What a look saw: the current mode's and the best three's predictions (what the debug log and a decision show). */
export interface Look {
  current: Prediction | undefined;
  top: Prediction[];
  fixedCpuMsPerBlock: number;
  overheadCpuMsPerBlock: number;
  /** the best compression now for chunks of each delta other than the mode's (kept current, not only at a switch) */
  compressFor: CompressFor;
}

export interface Decision {
  atMs: number;
  from: Mode;
  to: Mode;
  conditions: Conditions;
  /** predicted blocks/s of the current and the chosen mode */
  currentBlocksPerSec: number;
  chosenBlocksPerSec: number;
  top: Prediction[];
  /** for chunks delta-encoded under an earlier mode: the best compression for each other delta */
  compressFor: CompressFor;
}

export interface LookResult {
  state: PolicyState;
  look: Look;
  /** undefined: stay in the current mode */
  decision?: Decision;
}

/** Whether a prediction has the link as its bottleneck by `linkBoundMargin`: noise in either figure would not change it. */
export function clearlyLinkBound(p: Prediction | undefined, config: Pick<TunerConfig, 'linkBoundMargin'>): boolean {
  return p !== undefined && p.processingBlocksPerSec >= p.networkBlocksPerSec * config.linkBoundMargin;
}

/** Whether the sender found the link the bottleneck long enough; no figure yet is no. */
export function senderFindsLinkBound(linkBoundShare: number | undefined, config: Pick<TunerConfig, 'senderLinkBoundShare'>): boolean {
  return (linkBoundShare ?? 0) >= config.senderLinkBoundShare;
}

/**
 * Whether the first look decides at once on the profile's ratios, capture going on, and the ratio
 * probe comes later: where the start mode is within `startModeGoodShare` of the best. A capture held
 * for the probe holds the whole pipeline; going on risks no more than that share of the ratio.
 */
export function startModeNearBest(start: Prediction | undefined, best: Prediction | undefined, config: Pick<TunerConfig, 'startModeGoodShare'>): boolean {
  return start !== undefined && best !== undefined && start.blocksPerSec >= best.blocksPerSec * (1 - config.startModeGoodShare);
}

/**
 * Whether a look at `nowMs` starts the ratio probe put off until `dueMs`: only where the link is the
 * bottleneck, as predicted for the best mode and as the sender finds it, since ratios decide nothing
 * where the cores are, and the probe's process takes from them.
 */
export function putOffProbeStarts(dueMs: number, nowMs: number, best: Prediction | undefined, linkBoundShare: number | undefined, config: TunerConfig): boolean {
  return nowMs >= dueMs && clearlyLinkBound(best, config) && senderFindsLinkBound(linkBoundShare, config);
}

/** The best-ranked compression of each delta other than `chosen`'s (see ModeConfig). */
function compressionsFor(chosen: Mode, ranked: Prediction[], config: TunerConfig): CompressFor {
  const out: CompressFor = {};
  for (const delta of DELTA_ALGORITHMS) {
    // patch chunks leave delta compressed: compress never sees them
    if (delta === chosen.delta || delta === 'patch') continue;
    const best = pick(
      ranked.filter((p) => p.mode.delta === delta),
      config,
    );
    if (best) out[delta] = { compressor: best.mode.compressor, level: best.mode.level };
  }
  return out;
}

/**
 * A look: stay in `current` or switch to the best mode. The first look needs no confirmation (the
 * start mode is a guess); later ones need `confirmations` looks in a row that find the current mode
 * beaten, by any mode (where cheap modes tie, which comes first changes from look to look), unless
 * the gain is `clearGainFactor` times the hysteresis.
 */
export function decide(state: PolicyState, estimates: Estimates, current: Mode, conditions: Conditions, nowMs: number, config: TunerConfig): LookResult {
  const { costs, fixedCpuMsPerBlock } = estimates;
  const ranked = rank(costs, fixedCpuMsPerBlock, conditions);
  const best = pick(ranked, config);
  const currentCost = costs.find((c) => modeKey(c.mode) === modeKey(current));
  const currentPrediction = currentCost ? predict(currentCost, fixedCpuMsPerBlock, conditions) : undefined;
  const look: Look = {
    current: currentPrediction,
    top: ranked.slice(0, 3),
    fixedCpuMsPerBlock,
    overheadCpuMsPerBlock: currentCost?.overheadCpuMsPerBlock ?? 0,
    compressFor: compressionsFor(current, ranked, config),
  };
  if (!best) return { state, look };
  const firstLook = state.looks === 0;
  const next: PolicyState = { ...state, looks: state.looks + 1 };
  const currentRate = currentPrediction?.blocksPerSec ?? 0;
  const hysteresis = firstLook ? config.firstHysteresis : clearlyLinkBound(currentPrediction, config) && clearlyLinkBound(best, config) ? config.linkBoundHysteresis : config.hysteresis;
  if (modeKey(best.mode) === modeKey(current) || best.blocksPerSec <= currentRate * (1 + hysteresis)) return { state: { ...next, beatenLooks: 0 }, look };
  const clear = best.blocksPerSec > currentRate * (1 + config.clearGainFactor * config.hysteresis);
  if (!firstLook && !clear && next.beatenLooks + 1 < config.confirmations) return { state: { ...next, beatenLooks: next.beatenLooks + 1 }, look };
  const compressFor = compressionsFor(best.mode, ranked, config);
  return {
    state: { ...next, beatenLooks: 0 },
    look: { ...look, compressFor },
    decision: { atMs: nowMs, from: current, to: best.mode, conditions, currentBlocksPerSec: currentRate, chosenBlocksPerSec: best.blocksPerSec, top: ranked.slice(0, 3), compressFor },
  };
}

/**
 * How many of the running compress workers `mode` needs: the fewest whose predicted processing is
 * within `workersEnoughShare` of all of them, counting the link at `workersLinkFactor` times its
 * rate (the prediction is not exact). Cores a worker would only spin idle on stay with the VMs.
 */
export function workersFor(estimates: Estimates, mode: Mode, conditions: Conditions, config: TunerConfig): number {
  const running = Math.max(1, conditions.compressWorkers);
  const cost = estimates.costs.find((c) => modeKey(c.mode) === modeKey(mode));
  if (!cost || mode.compressor === 'none') return 1;
  const at = (n: number): Prediction => predict(cost, estimates.fixedCpuMsPerBlock, { ...conditions, compressWorkers: n });
  const all = at(running);
  const target = Math.min(all.processingBlocksPerSec, all.networkBlocksPerSec * config.workersLinkFactor);
  for (let n = 1; n < running; n++) if (at(n).processingBlocksPerSec >= target * config.workersEnoughShare) return n;
  return running;
}

/**
 * The compress workers to use now: all at first, more at once when the mode needs them, fewer only
 * after `workerLooks` looks in a row found the smaller count enough, and only while the sender finds
 * the link the bottleneck (a worker's capacity is not its CPU alone: it pulls one chunk per lane).
 */
export function workersWanted(state: PolicyState, estimates: Estimates, mode: Mode, conditions: Conditions, linkBoundShare: number | undefined, config: TunerConfig): { state: PolicyState; workers: number } {
  const running = Math.max(1, conditions.compressWorkers);
  const needed = senderFindsLinkBound(linkBoundShare, config) ? workersFor(estimates, mode, conditions, config) : running;
  const inUse = state.workersInUse ?? running;
  if (needed > inUse) return { state: { ...state, workersInUse: needed, fewerLooks: 0 }, workers: needed };
  if (needed === inUse) return { state: { ...state, workersInUse: inUse, fewerLooks: 0 }, workers: inUse };
  const fewerLooks = state.fewerLooks + 1;
  if (fewerLooks >= config.workerLooks) return { state: { ...state, workersInUse: needed, fewerLooks: 0 }, workers: needed };
  return { state: { ...state, workersInUse: inUse, fewerLooks }, workers: inUse };
}
