/**
 * Every threshold the tuner uses, in one object: the estimator's (how figures are measured and
 * what stands in until they are), the policy's (when a mode is left, how many compress workers),
 * the looks' (when one is due) and the ratio probe's (when it runs, how long a look waits for it).
 * The measurements behind each value are in docs/adaptive-mode.md.
 */
export interface TunerConfig {
  // --- estimator ---
  /** weight of a new sample in a running mean: costs vary chunk to chunk, modes change in seconds */
  alpha: number;
  /** blocks of measurement before a figure replaces its scaled profile (a chunk holds up to 256) */
  minBlocks: number;
  /** CPU no stage reports, per page's worth of bytes moved, until measured: without it a one-core source looked link-bound */
  priorOverheadCpuMsPerBusPage: number;
  /** what is neither measured nor scaled from a measurement costs this many times its profile while the actors warm up (JIT, fresh memory) */
  warmupCpuFactor: number;
  /** intervals of flow that count as warming up */
  warmupIntervals: number;
  /** intervals of flow, with the cores the bottleneck, before the unreported CPU has a figure of its own */
  cpuMinIntervals: number;
  /** the sender's link-bound share under which an interval is the link's, not the cores', and its figure only a floor */
  linkIntervalShare: number;
  /** pages a block moves through the bus before any mode was measured (the start mode's) */
  startBusPages: number;

  // --- policy ---
  /** predictions within this share of the best are ties: a sample's ratios differ from the image's by a few percent */
  tieShare: number;
  /** a tie goes to the better prediction only at up to this many times the cheapest tied mode's CPU (headroom for the cloudlet) */
  tieCpuFactor: number;
  /** a switch needs a predicted gain of at least this share: noise in the figures must not cause flapping */
  hysteresis: number;
  /** ... at the first look: the start mode is a guess, not a measured choice */
  firstHysteresis: number;
  /** ... where the link bounds both modes with room to spare: the gain is the ratio's alone, which link noise moves for both */
  linkBoundHysteresis: number;
  /** a gain this many times the hysteresis is taken on one look: a short fast phase is over by the second */
  clearGainFactor: number;
  /** looks in a row that must find the current mode beaten before a switch */
  confirmations: number;
  /** processing this many times the link's rate: the link is the bottleneck, whatever the noise in either figure */
  linkBoundMargin: number;
  /** the share of time the sender found the link the bottleneck from which workers may leave use and a put-off probe may start */
  senderLinkBoundShare: number;
  /** a start mode within this share of the best goes on without waiting for the ratio probe */
  startModeGoodShare: number;
  /** fewer compress workers only after this many looks in a row found them enough: estimates settle as a mode is measured */
  workerLooks: number;
  /** the fewest workers whose predicted processing is within this share of all of them are enough */
  workersEnoughShare: number;
  /** workers are counted against the link at this many times its rate: fewer only where the link clearly bounds */
  workersLinkFactor: number;
  /** how much smaller than thought a costly mode's ratio may prove: the probe leaves out modes that could not win even so */
  costlyRatioDoubt: number;

  // --- looks ---
  /** a look at every followed migration this often */
  lookEveryMs: number;
  /** a link this many times faster or slower than at the last look is looked at at once */
  bandwidthChangeFactor: number;
  /** ... but not twice within this */
  minLookGapMs: number;
  /** a migration without statistics this long has finished or was abandoned */
  followIdleMs: number;

  // --- ratio probe ---
  /** the longest the first look waits for the probe before deciding on the profile's ratios */
  probeWaitMs: number;
  /** a probe put off starts at a link-bound look at least this long after the first look: ratios matter only then */
  laterProbeAfterMs: number;
  /** a first look this soon after the accept probes in the tuner's process (the pipeline has only its head start) */
  probeHereWithinMs: number;
}

export const DEFAULT_TUNER_CONFIG: Readonly<TunerConfig> = {
  alpha: 0.05,
  minBlocks: 256,
  priorOverheadCpuMsPerBusPage: 0.05,
  warmupCpuFactor: 3,
  warmupIntervals: 4,
  cpuMinIntervals: 2,
  linkIntervalShare: 0.5,
  startBusPages: 4,

  tieShare: 0.03,
  tieCpuFactor: 1.5,
  hysteresis: 0.15,
  // a tie keeps the start mode: a switch for a percent or two took a costlier mode that could not keep up once the link sped up
  firstHysteresis: 0.03,
  linkBoundHysteresis: 0.025,
  clearGainFactor: 3,
  confirmations: 2,
  linkBoundMargin: 1.3,
  senderLinkBoundShare: 0.8,
  startModeGoodShare: 0.05,
  workerLooks: 4,
  workersEnoughShare: 0.97,
  workersLinkFactor: 2,
  costlyRatioDoubt: 0.8,

  lookEveryMs: 500,
  bandwidthChangeFactor: 1.5,
  minLookGapMs: 100,
  followIdleMs: 60_000,

  probeWaitMs: 2000,
  laterProbeAfterMs: 3000,
  probeHereWithinMs: 2000,
};

/** The defaults with `overrides` applied (a test's or an operator's). */
export function tunerConfig(overrides: Partial<TunerConfig> = {}): TunerConfig {
  return { ...DEFAULT_TUNER_CONFIG, ...overrides };
}
