/**
 * The tuner's pure core: learns each mode's cost and ratio from the running pipeline's statistics
 * (the profile scaled by measured/profiled until a mode has measurements of its own), and decides
 * when another mode's predicted throughput beats the current one by enough, for long enough.
 */
import type { StageStats } from '../../shared/model/migration.js';
import { DELTA_ALGORITHMS, type Mode, type ModeConfig } from '../../shared/model/mode.js';
import { PAGE_SIZE } from '../../shared/image/pages.js';
import { TIE_SHARE, deltaKey, modeKey, pick, predict, rank, type Conditions, type ModeCost, type Prediction, type Profile } from './model.js';

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
  /** blocks of measurement before a mode's own figures replace its scaled profile (a chunk holds up to 256) */
  minBlocks: number;
  alpha: number;
  /** the unreported CPU per bus page until it is measured (see PRIOR_OVERHEAD_CPU_MS_PER_BUS_PAGE) */
  priorOverheadCpuMsPerBusPage: number;
  /** what the profile and the prior say a block costs, times this, in a handoff's first seconds (see WARMUP_CPU_FACTOR) */
  warmupCpuFactor: number;
}

/**
 * The CPU no stage reports, per page's worth of bytes a block moves (see busPagesOf), until the
 * tuner has measured it (a second of flow with the cores the bottleneck, after warming up: a short
 * handoff is over before then). What the tuner measured on the machine the default profile was
 * made on. Without it the first looks took the cores for twice as fast as they were, the link for
 * the bottleneck, and chose modes for their ratio.
 */
const PRIOR_OVERHEAD_CPU_MS_PER_BUS_PAGE = 0.05;

/** processing this much above the link's rate: the link is the bottleneck, whatever the noise */
const LINK_BOUND_MARGIN = 1.3;

/** Whether a prediction has the link as its bottleneck by LINK_BOUND_MARGIN: noise in either figure would not change it. */
export function clearlyLinkBound(p: Prediction | undefined): boolean {
  return p !== undefined && p.processingBlocksPerSec >= p.networkBlocksPerSec * LINK_BOUND_MARGIN;
}

/**
 * The share of time the sender found the link the bottleneck from which compress workers may leave
 * use, and a ratio probe put off may start.
 */
const LINK_BOUND_SHARE = 0.8;

/** Whether the sender found the link the bottleneck long enough (LINK_BOUND_SHARE); no figure yet is no. */
function senderFindsLinkBound(linkBoundShare: number | undefined): boolean {
  return (linkBoundShare ?? 0) >= LINK_BOUND_SHARE;
}

/** ... and from which an interval is the link's, not the cores': its unreported CPU is not counted */
const LINK_BOUND_INTERVAL_SHARE = 0.5;

/**
 * The link's rate as the tuner takes it: the sender's figure from ACKs once it has one, else the
 * probe's. A figure taken while the link mostly waited on the pipeline (`linkBoundShare` below
 * LINK_BOUND_INTERVAL_SHARE) is a floor, not the link's rate: each frame is then alone on the link,
 * and its time counts the starved sender's late writes and ACK reads and the receiver's handling
 * with the link's; taken for the link's rate it sent the tuner back to compression the cores could
 * not afford. Below the probe it then stays the probe's. A real drop below the probe makes the link
 * the bottleneck, and the figure counts again.
 */
export function linkBandwidthBps(measuredBps: number, probedBps: number, linkBoundShare: number | undefined): number {
  if (measuredBps <= 0) return probedBps;
  const floorOnly = linkBoundShare !== undefined && linkBoundShare < LINK_BOUND_INTERVAL_SHARE;
  return floorOnly ? Math.max(measuredBps, probedBps) : measuredBps;
}

/** The start mode within this share of the best mode's prediction is good enough to go on in without waiting for the probe. */
export const START_MODE_GOOD_SHARE = 0.05;

/**
 * Whether the first look, finding the link the bottleneck, decides at once on the profile's ratios
 * (capture goes on, and the ratio probe comes later for the looks after): where the profile puts the
 * start mode within START_MODE_GOOD_SHARE of the best, whatever the link. A capture held for the
 * probe holds the whole pipeline, which a link that speeds up pays for; going on risks no more than
 * that share of the ratio until the probe is in. A start mode far behind is held for the look,
 * which waits for the probe.
 */
export function startModeNearBest(start: Prediction | undefined, best: Prediction | undefined): boolean {
  return start !== undefined && best !== undefined && start.blocksPerSec >= best.blocksPerSec * (1 - START_MODE_GOOD_SHARE);
}

/**
 * Whether a look at `nowMs` starts the ratio probe the first look put off until `dueMs`: only where
 * the link is the bottleneck, as predicted for the best mode and as the sender finds it
 * (`linkBoundShare`: the prediction alone passes where the sender seldom waits on the link), since
 * ratios decide nothing where the cores are, and the probe's process takes from them (see
 * LATER_PROBE_AFTER_MS in probes.ts).
 */
export function putOffProbeStarts(dueMs: number, nowMs: number, best: Prediction | undefined, linkBoundShare: number | undefined): boolean {
  return nowMs >= dueMs && clearlyLinkBound(best) && senderFindsLinkBound(linkBoundShare);
}

/** how the last measured mode's figures compare with its profile */
interface Scales {
  /** measured / profiled: of the codec alone where delta reports it, else of the whole stage */
  delta: number;
  /**
   * delta CPU per block beyond the scaled profile: its handling (reading base pages, the message)
   * where it reports its codec apart; where delta was never measured, compress's handling
   */
  deltaExtraMs: number;
  /** measured / profiled of the codec alone where the stage reports it, else of the whole stage */
  compress: number;
  /**
   * compress stage CPU per block beyond the scaled codec: its handling, the same whatever the mode;
   * where compress was never measured, what delta measured beyond its profile
   */
  compressExtraMs: number;
  /**
   * where compress was never measured, delta's scale: a costly codec is priced at its profile times
   * that at least (a costly codec slows down with the machine; priced from delta's excess alone,
   * zstd-19 looked cheap enough to choose and then held the link back)
   */
  compressAtLeast: number;
  ratio: number;
}

/** intervals (of the tuner's half second) of flow not counted in the unreported CPU: warming up */
const WARMUP_INTERVALS = 4;

/**
 * A block's CPU in a handoff's first seconds (WARMUP_INTERVALS of flow, and before it) over what it
 * costs later: every actor starts its work at once (JIT, fresh memory, streams filling). Priced at
 * the profile's steady figures, the first look took the cores for several times as fast as they
 * were and kept a mode that a later switch could no longer make up for. What is measured replaces it.
 */
const WARMUP_CPU_FACTOR = 3;

/** intervals (of the tuner's half second) of flow before the unreported CPU has a figure */
const CPU_MIN_INTERVALS = 2;

export const DEFAULT_TUNER_OPTIONS: TunerOptions = {
  hysteresis: 0.15,
  // A tie (see TIE_SHARE) keeps the start mode: a switch for a predicted gain of a percent or two
  // took a costlier mode that could not keep up once the link sped up; where it would have won, the
  // loss is its ratio's edge.
  firstHysteresis: TIE_SHARE,
  linkBoundHysteresis: 0.025,
  confirmations: 2,
  workerLooks: 4,
  minBlocks: 256,
  alpha: 0.05,
  priorOverheadCpuMsPerBusPage: PRIOR_OVERHEAD_CPU_MS_PER_BUS_PAGE,
  warmupCpuFactor: WARMUP_CPU_FACTOR,
};

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
  compressFor: NonNullable<ModeConfig['compressFor']>;
}

/** The best-ranked compression of each delta other than `chosen`'s (see ModeConfig). */
function compressionsFor(chosen: Mode, ranked: Prediction[]): NonNullable<ModeConfig['compressFor']> {
  const out: NonNullable<ModeConfig['compressFor']> = {};
  for (const delta of DELTA_ALGORITHMS) {
    // patch chunks leave delta compressed: compress never sees them
    if (delta === chosen.delta || delta === 'patch') continue;
    const best = pick(ranked.filter((p) => p.mode.delta === delta));
    if (best) out[delta] = { compressor: best.mode.compressor, level: best.mode.level };
  }
  return out;
}

/**
 * Pages' worth of bytes a block moves through the bus and the sender in `mode`: capture to dedup and
 * dedup on (a page each), delta's output when compress follows it (`deltaRatio`), compress's output,
 * and the sender's read and TLS of what goes out (`ratio`). JetStream stores and copies each message
 * and every hop encodes and decodes it, so the CPU no stage reports goes with bytes moved, not
 * messages (counted per message, a mode with a stage fewer but more bytes looked faster than it ran).
 */
export function busPagesOf(mode: Mode, ratio: number, deltaRatio: number): number {
  // a patch leaves delta compressed, for the wire
  if (mode.delta === 'patch') return 2 + ratio + ratio;
  const compressed = mode.compressor !== 'none';
  return 2 + (mode.delta !== 'none' ? (compressed ? deltaRatio : ratio) : 0) + (compressed ? ratio : 0) + ratio;
}

/** the start mode's, before any mode was sent */
const START_BUS_PAGES = 4;

export class Tuner {
  private readonly options: TunerOptions;
  private readonly profiled = new Map<string, ModeCost>();
  /**
   * Each mode's ratio before measurement scales it: the profile's, or what the ratio probe found on
   * this migration's own pages (see probe.ts)
   */
  private readonly ratioBasis = new Map<string, number>();
  private readonly deltaCost = new Map<string, Ewma>();
  /** the codec's share of delta's CPU per block, per delta (and patch level), where the stage reports it */
  private readonly deltaCodecCost = new Map<string, Ewma>();
  /** delta stage CPU per block beyond the codec (base pages read, the message): the same whatever the codec */
  private readonly deltaHandling: Ewma;
  private readonly compressCost = new Map<string, Ewma>();
  /** the codec's share of compress's CPU per block, per mode, where the stage reports it */
  private readonly codecCost = new Map<string, Ewma>();
  /** compress stage CPU per block beyond the codec (bus, message handling, the thread hand-off) */
  private readonly compressHandling: Ewma;
  private readonly ratio = new Map<string, Ewma>();
  /** delta's output per block over a page, per delta algorithm: what it puts on the bus */
  private readonly deltaRatio = new Map<string, Ewma>();
  /** capture's and dedup's CPU per page they take in, each stage its own (they add up) */
  private readonly pageCost: { capture: Ewma; dedup: Ewma };
  /** pages dedup takes in and blocks it passes on, per chunk: turn their per-page cost into per block */
  private readonly dedupPages: Ewma;
  private readonly dedupBlocks: Ewma;
  private lastMeasured: Mode | undefined;
  /** the modes that last went through delta and through compress (their CPU scales the others') */
  private lastDeltaMode: Mode | undefined;
  private lastCompressMode: Mode | undefined;
  /** blocks that left the pipeline for the wire since the last `observeOwnCpu` */
  private blocksOut = 0;
  /** since blocks flowed: the whole handoff's CPU (every actor, nats-server), what the stages reported, blocks sent */
  private readonly flow = { intervals: 0, cpuMs: 0, reportedCpuMs: 0, busPages: 0 };
  /** CPU the stages reported since the last `observeOwnCpu` */
  private reportedCpuMs = 0;
  /** intervals since blocks first reached the wire */
  private flowIntervals = 0;
  /** blocks have reached the wire: the pipeline is past filling */
  private blocksSeen = false;
  /** consecutive looks that found the current mode beaten by more than the hysteresis */
  private beatenLooks = 0;
  private looks = 0;
  /** what the last look predicted for the current mode and the best three: what a debug log shows */
  lastLook:
    | {
        current: Prediction | undefined;
        top: Prediction[];
        fixedCpuMsPerBlock: number;
        overheadCpuMsPerBlock: number;
        /** the best compression now for chunks of each delta other than the mode's (kept current, not only at a switch) */
        compressFor: NonNullable<ModeConfig['compressFor']>;
      }
    | undefined;

  constructor(
    private readonly profile: Profile,
    options: Partial<TunerOptions> = {},
  ) {
    this.options = { ...DEFAULT_TUNER_OPTIONS, ...options };
    for (const m of profile.modes) {
      this.profiled.set(modeKey(m.mode), m);
      this.ratioBasis.set(modeKey(m.mode), m.ratio);
    }
    this.pageCost = { capture: new Ewma(this.options.alpha), dedup: new Ewma(this.options.alpha) };
    this.compressHandling = new Ewma(this.options.alpha);
    this.deltaHandling = new Ewma(this.options.alpha);
    this.dedupPages = new Ewma(this.options.alpha);
    this.dedupBlocks = new Ewma(this.options.alpha);
  }

  /**
   * Ratios probed on this migration's own pages, all modes on the same pages: they replace the
   * profile's as the basis that the measured ratio of the mode in use scales. A mode not probed (too
   * costly to) follows the strongest probed level of its delta and compressor (else of its delta)
   * as profiled: its probed ratio times its profiled ratio over that mode's.
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
    if (!e) map.set(key, (e = new Ewma(this.options.alpha)));
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

  /** A stage's codec CPU per block into `codecs` (at `key`), and the rest of its CPU (its handling) into `handling`, where the stage reports its codec apart. */
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
   * Feeds the CPU the whole handoff took over the last interval (its actors, nats-server: what the
   * stages' own figures leave out, such as the bus, the sender, TLS), for this migration's share.
   * `linkBoundShare`: the share of the interval the sender found the link the bottleneck.
   */
  observeOwnCpu(cpuMs: number, linkBoundShare?: number): void {
    const blocks = this.blocksOut;
    const reportedCpuMs = this.reportedCpuMs;
    this.blocksOut = 0;
    this.reportedCpuMs = 0;
    // from the interval after the first blocks were sent: until then the pipeline fills (and its
    // processes warm up), CPU with few blocks to go with it
    if (!this.blocksSeen) {
      this.blocksSeen = blocks > 0;
      return;
    }
    // Counted only while the cores are the bottleneck: then the figure is what a block costs at the
    // rate the cores allow, where it bounds every mode. Waiting on a slow link, the CPU that goes on
    // whether blocks flow or not (timers, heartbeats, this tuner) spreads over few blocks and makes
    // costly modes look CPU-bound. Nor in the first two seconds of flow: every actor starts its work
    // at once then (JIT, the first scan, streams filling), and the figure, counted since, kept it
    if (++this.flowIntervals <= WARMUP_INTERVALS || (linkBoundShare ?? 0) >= LINK_BOUND_INTERVAL_SHARE) return;
    this.flow.intervals++;
    this.flow.cpuMs += cpuMs;
    this.flow.reportedCpuMs += reportedCpuMs;
    this.flow.busPages += blocks * this.busPagesNow();
  }

  /**
   * CPU per page's worth of bytes moved (see busPagesOf) that no stage reports: the handoff's whole
   * CPU (its processes, from /proc) minus what the stages reported, per block sent and the bytes it
   * moved on the bus and out, over the intervals the cores were the bottleneck since blocks flowed.
   * Every mode pays it (the sender, TLS, nats-server, each stage's messaging), so it bounds how fast
   * any mode can process once the cores are the limit; on one core it is several times a cheap
   * mode's whole cost. Counted since the flow began, not over the last second or two: a stage
   * reports a chunk's CPU when the chunk is done, and the tuner, on a busy core, reads reports late,
   * so a short window swung widely from one look to the next.
   * Until measured, the prior (TunerOptions.priorOverheadCpuMsPerBusPage), at warm-up's cost in the
   * first seconds (WARMUP_CPU_FACTOR).
   */
  get overheadCpuMsPerBusPage(): number {
    const f = this.flow;
    // a second of such flow and four times a mode's measuring minimum of blocks, at 3 pages each
    if (f.intervals < CPU_MIN_INTERVALS || f.busPages < this.options.minBlocks * 4 * 3) return this.options.priorOverheadCpuMsPerBusPage * this.unmeasuredScale;
    return Math.max(0, (f.cpuMs - f.reportedCpuMs) / f.busPages);
  }

  /** what a figure neither measured nor scaled from a measurement is priced at, over the profile's or the prior's: warm-up's, then 1 */
  private get unmeasuredScale(): number {
    return this.flowIntervals < WARMUP_INTERVALS ? this.options.warmupCpuFactor : 1;
  }

  /** the unreported CPU per block of the mode sent last (what a decision lists) */
  get overheadCpuMsPerBlock(): number {
    return this.overheadCpuMsPerBusPage * this.busPagesNow();
  }

  /** bus pages per block of the mode sent last, from its measured ratios where it has them */
  private busPagesNow(): number {
    const m = this.lastMeasured;
    if (!m) return START_BUS_PAGES;
    const k = this.scales();
    return busPagesOf(m, this.ratioOf(m, k), this.deltaRatioOf(m, k));
  }

  private measured(map: Map<string, Ewma>, key: string): number | undefined {
    const e = map.get(key);
    return e && this.measuredEwma(e);
  }

  /** a figure once it has `minBlocks` of measurement behind it */
  private measuredEwma(e: Ewma): number | undefined {
    return e.weight * 64 >= this.options.minBlocks ? e.value : undefined;
  }

  /**
   * How the figures measured compare with the profile: the CPU of the modes that last went through
   * delta and through compress, the ratio of the mode sent last. Within a stage a mode's codec
   * scales from another's as profiled, and the stage's handling around it (each stage reports its
   * codec's CPU apart) is added as measured. A stage the mode in use skips keeps what it last measured.
   * A stage never measured in this migration is priced from the other: delta from compress's codec
   * scale and handling; compress from all that delta measured beyond its profile, added to its own:
   * with the cheap codecs of the start modes that excess is mostly handling (reading base pages,
   * buffers), which every stage pays whatever its codec (copies to and from a thread), and at least
   * its profile at delta's whole scale (a costly codec slows down with the machine). Taken at its
   * profile, an unmeasured stage looked several times cheaper than the one measured, and the tuner
   * went back and forth between the two stages. In the
   * first seconds a compress stage never measured is at warm-up's cost (with delta measured, on top
   * of delta's excess, which carries warm-up too), and so is delta where neither was measured.
   */
  private scales(): Scales {
    const m = this.lastMeasured;
    const p = m && this.profiled.get(modeKey(m));
    const scale = (measured: number | undefined, profiled: number | undefined): number | undefined =>
      measured !== undefined && profiled !== undefined && profiled > 0 ? measured / profiled : undefined;
    const excess = (measured: number | undefined, profiled: number | undefined): number | undefined =>
      measured !== undefined && profiled !== undefined ? Math.max(0, measured - profiled) : undefined;
    const dm = this.lastDeltaMode;
    const deltaMeasured = dm && this.measured(this.deltaCost, deltaKey(dm));
    const deltaProfiled = dm && this.profiled.get(modeKey(dm))?.deltaCpuMsPerBlock;
    // the codec's CPU scales from mode to mode as profiled; the handling around it does not: scaled
    // whole, a cheap codec's stage (mostly handling) made a costly codec look several times its cost
    const cm = this.lastCompressMode;
    const compressProfiled = cm && this.profiled.get(modeKey(cm))?.compressCpuMsPerBlock;
    const compressMeasured = cm && this.measured(this.compressCost, modeKey(cm));
    const codec = cm && this.measured(this.codecCost, modeKey(cm));
    const handling = this.measuredEwma(this.compressHandling);
    const split = handling !== undefined ? scale(codec, compressProfiled) : undefined;
    const whole = scale(compressMeasured, compressProfiled);
    const delta = scale(deltaMeasured, deltaProfiled);
    // the same split within delta: its handling (a syscall and a buffer per base page read, the
    // message) does not grow with a patch's level; scaled whole, a high level was priced at twice
    // what it costs
    const deltaHandling = this.measuredEwma(this.deltaHandling);
    const deltaCodec = dm && this.measured(this.deltaCodecCost, deltaKey(dm));
    const deltaSplit = deltaHandling !== undefined ? scale(deltaCodec, deltaProfiled) : undefined;
    return {
      // delta never measured: the codec's scale and the handling compress measured (else its whole scale)
      delta: deltaSplit ?? delta ?? split ?? whole ?? this.unmeasuredScale,
      deltaExtraMs: deltaSplit !== undefined ? deltaHandling! : delta === undefined && split !== undefined ? handling! : 0,
      compress: split ?? whole ?? this.unmeasuredScale,
      compressExtraMs: split !== undefined ? handling! : whole !== undefined ? 0 : (excess(deltaMeasured, deltaProfiled) ?? 0),
      compressAtLeast: split === undefined && whole === undefined ? (delta ?? 0) : 0,
      ratio: (m && p && scale(this.measured(this.ratio, modeKey(m)), this.ratioBasis.get(modeKey(m)) ?? p.ratio)) ?? 1,
    };
  }

  /**
   * Every profiled mode's cost as it looks now: its own measured CPU costs, else its profile scaled
   * by measured/profiled of the last measured mode (modes keep their relative cost across
   * workloads; their relative ratios come from the probe where it ran). Ratios always come from the
   * mode being sent now: another mode's ratio measured a while ago was measured on other pages (a
   * region of random data makes every mode look worse), so comparing it with today's would switch
   * on content, not on mode. No encoding makes data larger
   * (pages are kept raw when delta does not pay), so a scaled ratio stops at 1, and sending pages
   * as they are is 1 by definition.
   */
  costs(): ModeCost[] {
    const k = this.scales();
    return this.profile.modes.map((p) => this.costOf(p, k));
  }

  /**
   * A mode's ratio as it looks now: measured if it is the mode being sent, else its basis (probed or
   * profiled) scaled by measured/basis of the mode being sent; 1 for a page sent as it is, or where
   * the mode is unknown.
   */
  private ratioOf(mode: Mode, k: Scales): number {
    const key = modeKey(mode);
    const current = this.lastMeasured && modeKey(this.lastMeasured);
    if (current === key) {
      const measured = this.measured(this.ratio, key);
      if (measured !== undefined) return measured;
    }
    if (mode.compressor === 'none' && mode.delta === 'none') return 1;
    const basis = this.ratioBasis.get(key);
    return basis === undefined ? 1 : Math.min(1, basis * k.ratio);
  }

  /** what delta puts on the bus per block over a page: measured, else its mode without compression's ratio */
  private deltaRatioOf(mode: Mode, k: Scales): number {
    if (mode.delta === 'patch') return this.ratioOf(mode, k);
    return this.measured(this.deltaRatio, deltaKey(mode)) ?? this.ratioOf({ delta: mode.delta, compressor: 'none', level: 0 }, k);
  }

  /** one profiled mode's cost as it looks now, given the scales of the last measured mode */
  private costOf(p: ModeCost, k: Scales): ModeCost {
    const key = modeKey(p.mode);
    const ratio = this.ratioOf(p.mode, k);
    return {
      mode: p.mode,
      deltaCpuMsPerBlock: p.mode.delta === 'none' ? 0 : (this.measured(this.deltaCost, deltaKey(p.mode)) ?? p.deltaCpuMsPerBlock * k.delta + k.deltaExtraMs),
      // patch compresses in delta: compress never sees its chunks
      compressCpuMsPerBlock: p.mode.compressor === 'none' || p.mode.delta === 'patch' ? 0 : (this.measured(this.compressCost, key) ?? Math.max(p.compressCpuMsPerBlock * k.compress + k.compressExtraMs, p.compressCpuMsPerBlock * k.compressAtLeast)),
      ratio,
      overheadCpuMsPerBlock: this.overheadCpuMsPerBusPage * busPagesOf(p.mode, ratio, this.deltaRatioOf(p.mode, k)),
    };
  }

  /** capture's and dedup's CPU per block sent on (the profile's, at warm-up's cost in the first seconds, until both reported) */
  get fixedCpuMsPerBlock(): number {
    const { capture, dedup } = this.pageCost;
    if (capture.weight === 0 || dedup.weight === 0 || this.dedupBlocks.value <= 0) return this.profile.fixedCpuMsPerBlock * this.unmeasuredScale;
    return (capture.value + dedup.value) * (this.dedupPages.value / this.dedupBlocks.value);
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
    const shared = this.fixedCpuMsPerBlock;
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
   * worker fewer slowed a handoff down while the model found it enough.
   */
  workersWanted(mode: Mode, conditions: Conditions, linkBoundShare?: number): number {
    const needed = senderFindsLinkBound(linkBoundShare) ? this.workersFor(mode, conditions) : Math.max(1, conditions.compressWorkers);
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

  /** every mode's prediction now, fastest first, without a look (nothing counted, nothing decided) */
  predictNow(conditions: Conditions): Prediction[] {
    return rank(this.costs(), this.fixedCpuMsPerBlock, conditions);
  }

  /** A decision to switch away from `current`, or undefined to stay. */
  decide(current: Mode, conditions: Conditions, nowMs: number): Decision | undefined {
    const costs = this.costs();
    const shared = this.fixedCpuMsPerBlock;
    const ranked = rank(costs, shared, conditions);
    const best = pick(ranked);
    if (!best) return undefined;
    const currentCost = costs.find((c) => modeKey(c.mode) === modeKey(current));
    const currentPrediction = currentCost ? predict(currentCost, shared, conditions) : undefined;
    const currentRate = currentPrediction?.blocksPerSec ?? 0;
    this.lastLook = {
      current: currentPrediction,
      top: ranked.slice(0, 3),
      fixedCpuMsPerBlock: shared,
      overheadCpuMsPerBlock: currentCost?.overheadCpuMsPerBlock ?? 0,
      compressFor: compressionsFor(current, ranked),
    };
    const bestKey = modeKey(best.mode);
    const firstLook = this.looks++ === 0;
    const hysteresis =
      firstLook ? this.options.firstHysteresis : clearlyLinkBound(currentPrediction) && clearlyLinkBound(best) ? this.options.linkBoundHysteresis : this.options.hysteresis;
    if (bestKey === modeKey(current) || best.blocksPerSec <= currentRate * (1 + hysteresis)) {
      this.beatenLooks = 0;
      return undefined;
    }
    // the current mode beaten by enough in consecutive decisions, so one noisy sample does not switch
    // back and forth; then to the best of the last look. Not the same best mode each time: where
    // several cheap modes tie, which of them comes first changes with every look, and a switch that
    // waits for one never comes. The first look needs no confirmation (the start mode is a guess,
    // not a measurement); later ones do, switch or no switch before (the first chunks' costs are
    // measured while the actors warm up). A gain of three times the hysteresis is no noise: taken at
    // once (a short phase of a faster link is over by the second look)
    const clear = best.blocksPerSec > currentRate * (1 + 3 * this.options.hysteresis);
    if (!firstLook && !clear && ++this.beatenLooks < this.options.confirmations) return undefined;
    this.beatenLooks = 0;
    this.lastLook.compressFor = compressionsFor(best.mode, ranked);
    return {
      atMs: nowMs,
      from: current,
      to: best.mode,
      conditions,
      currentBlocksPerSec: currentRate,
      chosenBlocksPerSec: best.blocksPerSec,
      top: ranked.slice(0, 3),
      compressFor: this.lastLook.compressFor,
    };
  }
}
