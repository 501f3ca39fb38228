/**
 * The tuner's pure core: learns each mode's cost and ratio from the running pipeline's statistics
 * (the profile scaled by measured/profiled until a mode has measurements of its own), and decides
 * when another mode's predicted throughput beats the current one by enough, for long enough.
 */
import type { StageStats } from '../../shared/migration.js';
import type { Mode } from '../../shared/mode.js';
import { PAGE_SIZE } from '../../shared/pages.js';
import { modeKey, predict, rank, type Conditions, type ModeCost, type Prediction, type Profile } from './model.js';

/** Exponentially weighted mean that also counts its samples. */
class Ewma {
  value = 0;
  weight = 0;
  constructor(private readonly alpha: number) {}
  add(sample: number, weight = 1): void {
    if (!Number.isFinite(sample)) return;
    const a = 1 - (1 - this.alpha) ** weight;
    this.value = this.weight === 0 ? sample : this.value + a * (sample - this.value);
    this.weight += weight;
  }
}

export interface TunerOptions {
  /** a switch needs a predicted gain of at least this share (noise must not cause flapping) */
  hysteresis: number;
  /** ... except at the first look: the start mode is a guess, not a measured choice */
  firstHysteresis: number;
  /**
   * ... and where the link bounds both modes with room to spare: the gain is then the ratio's alone,
   * which bandwidth noise moves for both modes alike
   */
  linkBoundHysteresis: number;
  /** ... seen in this many consecutive decisions */
  confirmations: number;
  /** fewer compress workers once that many looks in a row found them enough */
  workerLooks: number;
  /** blocks of measurement before a mode's own figures replace its scaled profile */
  minBlocks: number;
  alpha: number;
}

/** processing this much above the link's rate: the link is the bottleneck, whatever the noise */
const LINK_BOUND_MARGIN = 1.3;

/** The share of time the sender found the link the bottleneck from which compress workers may leave use. */
const LINK_BOUND_SHARE = 0.8;

/** measured / profiled of the last measured mode, per figure */
interface Scales {
  delta: number;
  compress: number;
  ratio: number;
}

/** intervals (of the tuner's half second) the unreported CPU is measured over */
const CPU_WINDOW_INTERVALS = 4;

export const DEFAULT_TUNER_OPTIONS: TunerOptions = { hysteresis: 0.15, firstHysteresis: 0.02, linkBoundHysteresis: 0.025, confirmations: 2, workerLooks: 4, minBlocks: 64, alpha: 0.2 };

export interface Decision {
  atMs: number;
  from: Mode;
  to: Mode;
  conditions: Conditions;
  /** predicted blocks/s of the current and the chosen mode */
  currentBlocksPerSec: number;
  chosenBlocksPerSec: number;
  top: Prediction[];
}

export class Tuner {
  private readonly options: TunerOptions;
  private readonly profiled = new Map<string, ModeCost>();
  private readonly deltaCost = new Map<string, Ewma>();
  private readonly compressCost = new Map<string, Ewma>();
  private readonly ratio = new Map<string, Ewma>();
  private readonly fixedCost: Ewma;
  private lastMeasured: Mode | undefined;
  /** blocks that left the pipeline for the wire since the last `observeOwnCpu` */
  private blocksOut = 0;
  /** the last few intervals' CPU of the whole handoff (every actor, nats-server) and blocks sent */
  private readonly cpuWindow: { cpuMs: number; blocks: number }[] = [];
  /** blocks have reached the wire: the pipeline is past filling */
  private blocksSeen = false;
  private pending: { key: string; count: number } | undefined;
  private looks = 0;
  readonly decisions: Decision[] = [];

  constructor(
    private readonly profile: Profile,
    options: Partial<TunerOptions> = {},
  ) {
    this.options = { ...DEFAULT_TUNER_OPTIONS, ...options };
    for (const m of profile.modes) this.profiled.set(modeKey(m.mode), m);
    this.fixedCost = new Ewma(this.options.alpha);
  }

  private ewma(map: Map<string, Ewma>, key: string): Ewma {
    let e = map.get(key);
    if (!e) map.set(key, (e = new Ewma(this.options.alpha)));
    return e;
  }

  /** Feeds one chunk's statistics. `blocks`: pages that carried a body (dedup's output). */
  observe(s: StageStats): void {
    const blocks = s.counts?.blocks ?? 0;
    if (s.stage === 'capture' || s.stage === 'dedup') {
      if (s.pages > 0) this.fixedCost.add(s.cpuMs / s.pages, s.pages / 64);
    }
    if (blocks <= 0) return;
    const w = blocks / 64;
    if (s.stage === 'delta') this.ewma(this.deltaCost, s.mode.delta).add(s.cpuMs / blocks, w);
    if (s.stage === 'compress') this.ewma(this.compressCost, modeKey(s.mode)).add(s.cpuMs / blocks, w);
    if (s.next === 'wire' && s.stage !== 'capture') {
      this.ewma(this.ratio, modeKey(s.mode)).add(s.bytesOut / (blocks * PAGE_SIZE), w);
      this.lastMeasured = s.mode;
      this.blocksOut += blocks;
    }
  }

  /** blocks sent since the last `observeOwnCpu`: the service shares the handoff's CPU by them */
  get blocksSinceOwnCpu(): number {
    return this.blocksOut;
  }

  /**
   * Feeds the CPU the whole handoff took over the last interval (its actors, nats-server: what the
   * stages' own figures leave out, such as the bus, the sender, TLS), for this migration's share.
   */
  observeOwnCpu(cpuMs: number): void {
    const blocks = this.blocksOut;
    this.blocksOut = 0;
    // from the interval after the first blocks were sent: until then the pipeline fills (and its
    // processes warm up), CPU with few blocks to go with it
    if (!this.blocksSeen) {
      this.blocksSeen = blocks > 0;
      return;
    }
    this.cpuWindow.push({ cpuMs, blocks });
    if (this.cpuWindow.length > CPU_WINDOW_INTERVALS) this.cpuWindow.shift();
  }

  /**
   * CPU per block that no stage reports, from the last intervals: the handoff's whole CPU per block
   * sent minus what the model counts for the mode that was sent. Every mode pays it, so it bounds
   * how fast any mode can process once the cores are the limit (0 until blocks flowed for a window).
   */
  get overheadCpuMsPerBlock(): number {
    const cpuMs = this.cpuWindow.reduce((a, w) => a + w.cpuMs, 0);
    const blocks = this.cpuWindow.reduce((a, w) => a + w.blocks, 0);
    const m = this.lastMeasured;
    // a whole window of steady flow: a shorter one over-counts the start
    if (this.cpuWindow.length < CPU_WINDOW_INTERVALS || blocks < this.options.minBlocks || !m) return 0;
    const profiled = this.profiled.get(modeKey(m));
    const cost = profiled && this.costOf(profiled, this.scales());
    const modelled = this.fixedCpuMsPerBlock + (cost ? cost.deltaCpuMsPerBlock + cost.compressCpuMsPerBlock : 0);
    return Math.max(0, cpuMs / blocks - modelled);
  }

  /** CPU per block every mode pays: capture and dedup, and what no stage reports */
  private sharedCpuMsPerBlock(): number {
    return this.fixedCpuMsPerBlock + this.overheadCpuMsPerBlock;
  }

  private measured(map: Map<string, Ewma>, key: string): number | undefined {
    const e = map.get(key);
    return e && e.weight * 64 >= this.options.minBlocks ? e.value : undefined;
  }

  /** measured / profiled of the most recently measured mode, per figure (1 where unknown) */
  private scales(): Scales {
    const m = this.lastMeasured;
    const p = m && this.profiled.get(modeKey(m));
    if (!m || !p) return { delta: 1, compress: 1, ratio: 1 };
    const scale = (measured: number | undefined, profiled: number): number => (measured !== undefined && profiled > 0 ? measured / profiled : 1);
    return {
      delta: scale(this.measured(this.deltaCost, m.delta), p.deltaCpuMsPerBlock),
      compress: scale(this.measured(this.compressCost, modeKey(m)), p.compressCpuMsPerBlock),
      ratio: scale(this.measured(this.ratio, modeKey(m)), p.ratio),
    };
  }

  /**
   * Every profiled mode's cost as it looks now: its own measured CPU costs, else its profile scaled
   * by measured/profiled of the last measured mode (modes keep their relative cost and ratio across
   * workloads). Ratios always come from the mode being sent now: another mode's ratio measured a
   * while ago was measured on other pages (a region of random data makes every mode look worse), so
   * comparing it with today's would switch on content, not on mode. No encoding makes data larger
   * (pages are kept raw when delta does not pay), so a scaled ratio stops at 1, and sending pages
   * as they are is 1 by definition.
   */
  costs(): ModeCost[] {
    const k = this.scales();
    return this.profile.modes.map((p) => this.costOf(p, k));
  }

  /** one profiled mode's cost as it looks now, given the scales of the last measured mode */
  private costOf(p: ModeCost, k: Scales): ModeCost {
    const key = modeKey(p.mode);
    const current = this.lastMeasured && modeKey(this.lastMeasured);
    const plain = p.mode.compressor === 'none' && p.mode.delta === 'none';
    return {
      mode: p.mode,
      deltaCpuMsPerBlock: this.measured(this.deltaCost, p.mode.delta) ?? p.deltaCpuMsPerBlock * k.delta,
      compressCpuMsPerBlock: p.mode.compressor === 'none' ? 0 : (this.measured(this.compressCost, key) ?? p.compressCpuMsPerBlock * k.compress),
      ratio: (current === key ? this.measured(this.ratio, key) : undefined) ?? (plain ? 1 : Math.min(1, p.ratio * k.ratio)),
    };
  }

  get fixedCpuMsPerBlock(): number {
    return this.fixedCost.weight > 0 ? this.fixedCost.value : this.profile.fixedCpuMsPerBlock;
  }

  /**
   * How many of the running compress workers `mode` needs: the fewest that keep its predicted
   * throughput within 3% of what all of them give, counting the link at twice its bandwidth (the
   * prediction is not exact: fewer workers only where the link clearly is the bottleneck, or the
   * cores are). Cores a worker would only spin idle on stay with the cloudlet's VMs.
   */
  workersFor(mode: Mode, conditions: Conditions): number {
    const running = Math.max(1, conditions.compressWorkers);
    const cost = this.costs().find((c) => modeKey(c.mode) === modeKey(mode));
    if (!cost || mode.compressor === 'none') return 1;
    const shared = this.sharedCpuMsPerBlock();
    const at = (n: number): Prediction => predict(cost, shared, { ...conditions, compressWorkers: n });
    const all = at(running);
    const target = Math.min(all.processingBlocksPerSec, all.networkBlocksPerSec * 2);
    for (let n = 1; n < running; n++) if (at(n).processingBlocksPerSec >= target * 0.97) return n;
    return running;
  }

  private workersInUse: number | undefined;
  private fewerLooks = 0;

  /**
   * The compress workers to use now: all that run at first, more at once when the mode needs them,
   * fewer only after the smaller count has been enough for `workerLooks` looks in a row (estimates
   * settle as a mode is measured; a count flapping every half second would only move work around),
   * and only while the sender measures the link as the bottleneck: a worker's capacity is not its
   * CPU alone (it pulls one chunk per lane from the bus), and with a core taken by other work one
   * worker fewer made a 100 Mbit/s handoff 19% slower while the model found it enough.
   */
  workersWanted(mode: Mode, conditions: Conditions, linkBoundShare?: number): number {
    const needed = (linkBoundShare ?? 0) >= LINK_BOUND_SHARE ? this.workersFor(mode, conditions) : Math.max(1, conditions.compressWorkers);
    // all of them at first: before measurements the prediction is the profile's (and the model
    // leaves out the sender's, the bus's and TLS's CPU), so fewer must prove enough first
    this.workersInUse ??= Math.max(1, conditions.compressWorkers);
    if (needed > this.workersInUse) {
      this.workersInUse = needed;
      this.fewerLooks = 0;
    } else if (needed < this.workersInUse) {
      if (++this.fewerLooks >= this.options.workerLooks) {
        this.workersInUse = needed;
        this.fewerLooks = 0;
      }
    } else this.fewerLooks = 0;
    return this.workersInUse;
  }

  /** A decision to switch away from `current`, or undefined to stay. */
  decide(current: Mode, conditions: Conditions, nowMs: number): Decision | undefined {
    const costs = this.costs();
    const shared = this.sharedCpuMsPerBlock();
    const ranked = rank(costs, shared, conditions);
    const best = ranked[0];
    if (!best) return undefined;
    const currentCost = costs.find((c) => modeKey(c.mode) === modeKey(current));
    const currentPrediction = currentCost ? predict(currentCost, shared, conditions) : undefined;
    const currentRate = currentPrediction?.blocksPerSec ?? 0;
    const bestKey = modeKey(best.mode);
    const linkBound = (p: Prediction | undefined): boolean => p !== undefined && p.processingBlocksPerSec >= p.networkBlocksPerSec * LINK_BOUND_MARGIN;
    const hysteresis =
      this.looks++ === 0 ? this.options.firstHysteresis : linkBound(currentPrediction) && linkBound(best) ? this.options.linkBoundHysteresis : this.options.hysteresis;
    if (bestKey === modeKey(current) || best.blocksPerSec <= currentRate * (1 + hysteresis)) {
      this.pending = undefined;
      return undefined;
    }
    // the same better mode in consecutive decisions, so one noisy sample does not switch back and
    // forth; the first switch needs no confirmation (the start mode is a guess, not a measurement)
    this.pending = this.pending?.key === bestKey ? { key: bestKey, count: this.pending.count + 1 } : { key: bestKey, count: 1 };
    if (this.decisions.length > 0 && this.pending.count < this.options.confirmations) return undefined;
    this.pending = undefined;
    const decision: Decision = {
      atMs: nowMs,
      from: current,
      to: best.mode,
      conditions,
      currentBlocksPerSec: currentRate,
      chosenBlocksPerSec: best.blocksPerSec,
      top: ranked.slice(0, 3),
    };
    this.decisions.push(decision);
    return decision;
  }
}
