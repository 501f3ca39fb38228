/**
 * The tuner's estimator: observations in (each chunk's stage statistics, the handoff's whole CPU,
 * the ratio probe's figures), each mode's predicted cost and ratio out. A mode is priced from its
 * own measurements once it has them, else from the profile scaled by how the modes measured here
 * compare with their profile (modes keep their relative cost and ratio across workloads), in the
 * one fallback order of `pricing`.
 */
import type { StageStats } from '../../shared/model/migration.js';
import type { Mode } from '../../shared/model/mode.js';
import { PAGE_SIZE } from '../../shared/image/pages.js';
import { tunerConfig, type TunerConfig } from './config.js';
import { deltaKey, modeKey, type ModeCost, type Profile } from './model.js';

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

/** What the policy decides on: every profiled mode's cost as it looks now, and what every mode pays. */
export interface Estimates {
  costs: ModeCost[];
  /** capture's and dedup's CPU per block, whatever the mode */
  fixedCpuMsPerBlock: number;
}

/**
 * The link's rate as the tuner takes it: the sender's figure from ACKs once it has one, else the
 * probe's. A figure taken while the link mostly waited on the pipeline (`linkBoundShare` below
 * `linkIntervalShare`) is a floor, not the link's rate: each frame was alone on the link, and its
 * time counts the starved pipeline's pace. Below the probe it then stays the probe's.
 */
export function linkBandwidthBps(measuredBps: number, probedBps: number, linkBoundShare: number | undefined, config: Pick<TunerConfig, 'linkIntervalShare'> = tunerConfig()): number {
  if (measuredBps <= 0) return probedBps;
  const floorOnly = linkBoundShare !== undefined && linkBoundShare < config.linkIntervalShare;
  return floorOnly ? Math.max(measuredBps, probedBps) : measuredBps;
}

/**
 * Pages' worth of bytes a block moves through the bus and the sender in `mode`: capture to dedup and
 * dedup on (a page each), delta's output when compress follows it (`deltaRatio`), compress's output,
 * and the sender's read of what goes out (`ratio`). JetStream stores and copies each message and
 * every hop encodes and decodes it, so the CPU no stage reports goes with bytes moved, not messages.
 */
export function busPagesOf(mode: Mode, ratio: number, deltaRatio: number): number {
  // a patch leaves delta compressed, for the wire
  if (mode.delta === 'patch') return 2 + ratio + ratio;
  const compressed = mode.compressor !== 'none';
  return 2 + (mode.delta !== 'none' ? (compressed ? deltaRatio : ratio) : 0) + (compressed ? ratio : 0) + ratio;
}

/**
 * How one stage's codec is priced for modes it has not measured: the profile's codec CPU times
 * `scale`, plus `extraMs` of handling (the same whatever the codec), and at least the profile
 * times `atLeastScale`.
 */
interface StagePricing {
  scale: number;
  extraMs: number;
  atLeastScale: number;
}

/** The scales of the last measured modes against their profile: how every other mode is priced. */
interface Pricing {
  delta: StagePricing;
  compress: StagePricing;
  /** measured / basis of the ratio of the mode being sent */
  ratio: number;
}

/** the first candidate that applies */
function firstOf<T>(...candidates: (T | undefined)[]): T {
  const found = candidates.find((c) => c !== undefined);
  if (found === undefined) throw new Error('no candidate applies'); // the last candidate always does
  return found;
}

export class Estimator {
  private readonly config: TunerConfig;
  private readonly profiled = new Map<string, ModeCost>();
  /** each mode's ratio before measurement scales it: the profile's, or the ratio probe's on this migration's pages */
  private readonly ratioBasis = new Map<string, number>();
  private readonly deltaCost = new Map<string, Ewma>();
  /** delta's codec CPU per block, per delta (and patch level), where the stage reports it apart */
  private readonly deltaCodecCost = new Map<string, Ewma>();
  /** delta's CPU per block beyond its codec (base pages read, the message) */
  private readonly deltaHandling: Ewma;
  private readonly compressCost = new Map<string, Ewma>();
  /** compress's codec CPU per block, per mode, where the stage reports it apart */
  private readonly codecCost = new Map<string, Ewma>();
  /** compress's CPU per block beyond its codec (the bus, the thread hand-off) */
  private readonly compressHandling: Ewma;
  private readonly ratio = new Map<string, Ewma>();
  /** delta's output per block over a page, per delta: what it puts on the bus */
  private readonly deltaRatio = new Map<string, Ewma>();
  /** capture's and dedup's CPU per page they take in (they add up) */
  private readonly pageCost: { capture: Ewma; dedup: Ewma };
  /** pages dedup takes in and blocks it passes on, per chunk: per-page cost into per-block */
  private readonly dedupPages: Ewma;
  private readonly dedupBlocks: Ewma;
  /** the mode sent last, and those that last went through delta and compress (their CPU scales the others') */
  private lastMeasured: Mode | undefined;
  private lastDeltaMode: Mode | undefined;
  private lastCompressMode: Mode | undefined;
  /** blocks that left the pipeline for the wire since the last `observeOwnCpu` */
  private blocksOut = 0;
  /** CPU the stages reported since the last `observeOwnCpu` */
  private reportedCpuMs = 0;
  /** counted flow (cores the bottleneck, past warming up): the handoff's whole CPU, what the stages reported, bus pages moved */
  private readonly flow = { intervals: 0, cpuMs: 0, reportedCpuMs: 0, busPages: 0 };
  /** intervals since blocks first reached the wire */
  private flowIntervals = 0;
  private blocksSeen = false;

  constructor(
    private readonly profile: Profile,
    config: Partial<TunerConfig> = {},
  ) {
    this.config = tunerConfig(config);
    for (const m of profile.modes) {
      this.profiled.set(modeKey(m.mode), m);
      this.ratioBasis.set(modeKey(m.mode), m.ratio);
    }
    const ewma = (): Ewma => new Ewma(this.config.alpha);
    this.pageCost = { capture: ewma(), dedup: ewma() };
    this.compressHandling = ewma();
    this.deltaHandling = ewma();
    this.dedupPages = ewma();
    this.dedupBlocks = ewma();
  }

  /** What the policy decides on now. */
  estimates(): Estimates {
    return { costs: this.costs(), fixedCpuMsPerBlock: this.fixedCpuMsPerBlock };
  }

  /**
   * Ratios probed on this migration's own pages, all modes on the same pages: they replace the
   * profile's as the basis. A mode not probed (too costly to) follows the strongest probed level of
   * its delta and compressor (else of its delta): that one's probed ratio times their profiled ratio.
   */
  useProbedRatios(ratios: ReadonlyMap<string, number>): void {
    const usable = (key: string): boolean => {
      const r = ratios.get(key);
      return r !== undefined && Number.isFinite(r) && r > 0 && this.profiled.has(key);
    };
    const probed = [...ratios.keys()].filter(usable).map((key) => this.profiled.get(key)!);
    for (const p of this.profile.modes) {
      const key = modeKey(p.mode);
      if (usable(key)) {
        this.ratioBasis.set(key, ratios.get(key)!);
        continue;
      }
      const sameDelta = probed.filter((q) => q.mode.delta === p.mode.delta && q.ratio > 0);
      const sameCompressor = sameDelta.filter((q) => q.mode.compressor === p.mode.compressor);
      const ref = (sameCompressor.length > 0 ? sameCompressor : sameDelta).sort((a, b) => b.mode.level - a.mode.level)[0];
      if (ref) this.ratioBasis.set(key, Math.min(1, ratios.get(modeKey(ref.mode))! * (p.ratio / ref.ratio)));
    }
  }

  /** the ratio a mode is scaled from: probed, else profiled (what the probe's log shows) */
  ratioBasisOf(mode: Mode): number | undefined {
    return this.ratioBasis.get(modeKey(mode));
  }

  private ewma(map: Map<string, Ewma>, key: string): Ewma {
    let e = map.get(key);
    if (!e) map.set(key, (e = new Ewma(this.config.alpha)));
    return e;
  }

  /** Feeds one chunk's statistics. `blocks`: pages that carried a body (dedup's output). */
  observe(s: StageStats): void {
    const blocks = s.counts?.blocks ?? 0;
    // the sender's CPU stays in the unreported overhead, which observeOwnCpu measures from /proc
    if (s.stage !== 'sender') this.reportedCpuMs += s.cpuMs;
    if ((s.stage === 'capture' || s.stage === 'dedup') && s.pages > 0) this.pageCost[s.stage].add(s.cpuMs / s.pages, s.pages / 64);
    if (s.stage === 'dedup') {
      this.dedupPages.add(s.pages);
      this.dedupBlocks.add(blocks);
    }
    if (blocks <= 0) return;
    const w = blocks / 64;
    if (s.stage === 'delta') {
      this.lastDeltaMode = s.mode;
      this.ewma(this.deltaCost, deltaKey(s.mode)).add(s.cpuMs / blocks, w);
      this.ewma(this.deltaRatio, deltaKey(s.mode)).add(s.bytesOut / (blocks * PAGE_SIZE), w);
      this.observeCodec(s, this.deltaCodecCost, deltaKey(s.mode), this.deltaHandling, blocks);
    }
    if (s.stage === 'compress') {
      this.lastCompressMode = s.mode;
      this.ewma(this.compressCost, modeKey(s.mode)).add(s.cpuMs / blocks, w);
      this.observeCodec(s, this.codecCost, modeKey(s.mode), this.compressHandling, blocks);
    }
    if (s.next === 'wire' && s.stage !== 'capture') {
      this.ewma(this.ratio, modeKey(s.mode)).add(s.bytesOut / (blocks * PAGE_SIZE), w);
      this.lastMeasured = s.mode;
      this.blocksOut += blocks;
    }
  }

  /** A stage's codec CPU per block into `codecs`, the rest of its CPU into `handling`, where the stage reports its codec apart. */
  private observeCodec(s: StageStats, codecs: Map<string, Ewma>, key: string, handling: Ewma, blocks: number): void {
    const codecMs = s.counts?.codecCpuMs;
    if (codecMs === undefined) return;
    this.ewma(codecs, key).add(codecMs / blocks, blocks / 64);
    handling.add(Math.max(0, s.cpuMs - codecMs) / blocks, blocks / 64);
  }

  /** blocks sent since the last `observeOwnCpu`: the service shares the handoff's CPU by them */
  get blocksSinceOwnCpu(): number {
    return this.blocksOut;
  }

  /**
   * Feeds the CPU the whole handoff took over the last interval (its actors, nats-server), this
   * migration's share. Counted only while the cores are the bottleneck (`linkBoundShare` under
   * `linkIntervalShare`), and past warming up: waiting on a slow link, CPU that goes on whether
   * blocks flow or not spreads over few blocks and makes costly modes look CPU-bound.
   */
  observeOwnCpu(cpuMs: number, linkBoundShare?: number): void {
    const blocks = this.blocksOut;
    const reportedCpuMs = this.reportedCpuMs;
    this.blocksOut = 0;
    this.reportedCpuMs = 0;
    // until blocks reach the wire the pipeline fills: CPU with no blocks to go with it
    if (!this.blocksSeen) {
      this.blocksSeen = blocks > 0;
      return;
    }
    if (++this.flowIntervals <= this.config.warmupIntervals || (linkBoundShare ?? 0) >= this.config.linkIntervalShare) return;
    this.flow.intervals++;
    this.flow.cpuMs += cpuMs;
    this.flow.reportedCpuMs += reportedCpuMs;
    this.flow.busPages += blocks * this.busPagesNow();
  }

  /**
   * CPU per page's worth of bytes moved (see busPagesOf) that no stage reports (the sender, TLS,
   * nats-server, each stage's messaging), over all counted flow: reports arrive late on a busy core,
   * so a short window swung widely. Until measured, the prior, at warm-up's cost at first.
   */
  get overheadCpuMsPerBusPage(): number {
    const f = this.flow;
    // a second of such flow and four times a mode's measuring minimum of blocks, at 3 pages each
    if (f.intervals < this.config.cpuMinIntervals || f.busPages < this.config.minBlocks * 4 * 3) return this.config.priorOverheadCpuMsPerBusPage * this.unmeasuredScale;
    return Math.max(0, (f.cpuMs - f.reportedCpuMs) / f.busPages);
  }

  /** what a figure neither measured nor scaled from a measurement is priced at, over its profile or prior */
  private get unmeasuredScale(): number {
    return this.flowIntervals < this.config.warmupIntervals ? this.config.warmupCpuFactor : 1;
  }

  /** the unreported CPU per block of the mode sent last (what a decision lists) */
  get overheadCpuMsPerBlock(): number {
    return this.overheadCpuMsPerBusPage * this.busPagesNow();
  }

  /** bus pages per block of the mode sent last, from its measured ratios where it has them */
  private busPagesNow(): number {
    const m = this.lastMeasured;
    if (!m) return this.config.startBusPages;
    const k = this.pricing();
    return busPagesOf(m, this.ratioOf(m, k), this.deltaRatioOf(m, k));
  }

  private measured(map: Map<string, Ewma>, key: string): number | undefined {
    const e = map.get(key);
    return e && this.measuredEwma(e);
  }

  /** a figure once it has `minBlocks` of measurement behind it */
  private measuredEwma(e: Ewma): number | undefined {
    return e.weight * 64 >= this.config.minBlocks ? e.value : undefined;
  }

  /**
   * How the modes not measured are priced, from what the last measured modes show against their
   * profile. A stage's codec scales from mode to mode as profiled; its handling around the codec
   * does not (scaled whole, a cheap codec's stage, mostly handling, made a costly codec look several
   * times its cost), so it is added as measured. For each stage, the first that applies:
   *
   * delta:    1. its codec measured apart: that scale, plus its handling as measured
   *           2. the stage measured whole: that scale
   *           3. compress's codec measured apart: compress's scale and handling
   *           4. compress measured whole: that scale
   *           5. the profile (at warm-up's cost in the first seconds)
   * compress: 1. its codec measured apart: that scale, plus its handling as measured
   *           2. the stage measured whole: that scale
   *           3. the profile (at warm-up's cost at first), plus what delta measured beyond its own
   *              profile (mostly handling, which every stage pays), and at least the profile at
   *              delta's whole scale (a costly codec slows down with the machine)
   */
  private pricing(): Pricing {
    const ratio = (measured: number | undefined, profiled: number | undefined): number | undefined =>
      measured !== undefined && profiled !== undefined && profiled > 0 ? measured / profiled : undefined;
    const dm = this.lastDeltaMode;
    const deltaProfiled = dm && this.profiled.get(modeKey(dm))?.deltaCpuMsPerBlock;
    const deltaMeasured = dm && this.measured(this.deltaCost, deltaKey(dm));
    const deltaHandling = this.measuredEwma(this.deltaHandling);
    const deltaSplit = deltaHandling !== undefined ? ratio(dm && this.measured(this.deltaCodecCost, deltaKey(dm)), deltaProfiled) : undefined;
    const deltaWhole = ratio(deltaMeasured, deltaProfiled);
    const cm = this.lastCompressMode;
    const compressProfiled = cm && this.profiled.get(modeKey(cm))?.compressCpuMsPerBlock;
    const compressHandling = this.measuredEwma(this.compressHandling);
    const compressSplit = compressHandling !== undefined ? ratio(cm && this.measured(this.codecCost, modeKey(cm)), compressProfiled) : undefined;
    const compressWhole = ratio(cm && this.measured(this.compressCost, modeKey(cm)), compressProfiled);
    const deltaExcessMs = deltaMeasured !== undefined && deltaProfiled !== undefined ? Math.max(0, deltaMeasured - deltaProfiled) : 0;
    const priced = (scale: number | undefined, extraMs = 0, atLeastScale = 0): StagePricing | undefined => (scale === undefined ? undefined : { scale, extraMs, atLeastScale });
    const unmeasured = this.unmeasuredScale;

    const m = this.lastMeasured;
    const p = m && this.profiled.get(modeKey(m));
    const ratioScale = m && p ? ratio(this.measured(this.ratio, modeKey(m)), this.ratioBasis.get(modeKey(m)) ?? p.ratio) : undefined;
    return {
      delta: firstOf(priced(deltaSplit, deltaHandling), priced(deltaWhole), priced(compressSplit, compressHandling), priced(compressWhole), priced(unmeasured)),
      compress: firstOf(priced(compressSplit, compressHandling), priced(compressWhole), priced(unmeasured, deltaExcessMs, deltaWhole ?? 0)),
      ratio: ratioScale ?? 1,
    };
  }

  /**
   * Every profiled mode's cost as it looks now: its own measured CPU, else its profile priced as
   * `pricing` says. Ratios always come from the mode being sent now: another mode's ratio measured a
   * while ago was measured on other pages, so comparing it with today's would switch on content,
   * not on mode. No encoding makes data larger (pages are kept raw when delta does not pay), so a
   * scaled ratio stops at 1.
   */
  costs(): ModeCost[] {
    const k = this.pricing();
    return this.profile.modes.map((p) => this.costOf(p, k));
  }

  /** measured if it is the mode being sent, else its basis scaled by measured/basis of the mode being sent; 1 for pages as they are */
  private ratioOf(mode: Mode, k: Pricing): number {
    const key = modeKey(mode);
    if (this.lastMeasured && modeKey(this.lastMeasured) === key) {
      const measured = this.measured(this.ratio, key);
      if (measured !== undefined) return measured;
    }
    if (mode.compressor === 'none' && mode.delta === 'none') return 1;
    const basis = this.ratioBasis.get(key);
    return basis === undefined ? 1 : Math.min(1, basis * k.ratio);
  }

  /** what delta puts on the bus per block over a page: measured, else its mode without compression's ratio */
  private deltaRatioOf(mode: Mode, k: Pricing): number {
    if (mode.delta === 'patch') return this.ratioOf(mode, k);
    return this.measured(this.deltaRatio, deltaKey(mode)) ?? this.ratioOf({ delta: mode.delta, compressor: 'none', level: 0 }, k);
  }

  private costOf(p: ModeCost, k: Pricing): ModeCost {
    const key = modeKey(p.mode);
    const ratio = this.ratioOf(p.mode, k);
    const unmeasured = (profiledMs: number, s: StagePricing): number => Math.max(profiledMs * s.scale + s.extraMs, profiledMs * s.atLeastScale);
    return {
      mode: p.mode,
      deltaCpuMsPerBlock: p.mode.delta === 'none' ? 0 : (this.measured(this.deltaCost, deltaKey(p.mode)) ?? unmeasured(p.deltaCpuMsPerBlock, k.delta)),
      // patch compresses in delta: compress never sees its chunks
      compressCpuMsPerBlock: p.mode.compressor === 'none' || p.mode.delta === 'patch' ? 0 : (this.measured(this.compressCost, key) ?? unmeasured(p.compressCpuMsPerBlock, k.compress)),
      ratio,
      overheadCpuMsPerBlock: this.overheadCpuMsPerBusPage * busPagesOf(p.mode, ratio, this.deltaRatioOf(p.mode, k)),
    };
  }

  /** capture's and dedup's CPU per block sent on (the profile's, at warm-up's cost at first, until both reported) */
  get fixedCpuMsPerBlock(): number {
    const { capture, dedup } = this.pageCost;
    if (capture.weight === 0 || dedup.weight === 0 || this.dedupBlocks.value <= 0) return this.profile.fixedCpuMsPerBlock * this.unmeasuredScale;
    return (capture.value + dedup.value) * (this.dedupPages.value / this.dedupBlocks.value);
  }
}
