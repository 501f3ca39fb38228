/**
 * The throughput model (Elijah's, extended): for each mode, predict processing throughput from CPU
 * cost per block and the cores and workers there are, network throughput from output ratio and
 * bandwidth, and take the mode whose min(processing, network) is highest.
 */
import { formatMode, type Mode } from '../../shared/model/mode.js';
import { PAGE_SIZE } from '../../shared/image/pages.js';
import { DEFAULT_TUNER_CONFIG, type TunerConfig } from './config.js';

/** One mode's costs, per 4 KiB block of dedup output (the input the mode-dependent stages see). */
export interface ModeCost {
  mode: Mode;
  /** delta stage CPU ms per block */
  deltaCpuMsPerBlock: number;
  /** compress stage CPU ms per block */
  compressCpuMsPerBlock: number;
  /** wire bytes / input bytes after delta and compression */
  ratio: number;
  /** CPU per block no stage reports (nats-server, the sender, each stage's messaging): measured, not profiled */
  overheadCpuMsPerBlock?: number;
}

export interface Profile {
  /** what was profiled, when, on what */
  workload: string;
  createdAt: string;
  /** mode-independent costs per block of dirty input: capture+dedup (+ sender) */
  fixedCpuMsPerBlock: number;
  modes: ModeCost[];
}

export interface Conditions {
  bandwidthBps: number;
  /** cores the pipeline may use now: the machine's minus what other work takes */
  spareCores: number;
  /** compress worker processes running */
  compressWorkers: number;
}

export interface Prediction {
  mode: Mode;
  processingBlocksPerSec: number;
  networkBlocksPerSec: number;
  blocksPerSec: number;
}

const BLOCK_BITS = PAGE_SIZE * 8;

export function modeKey(mode: Mode): string {
  return formatMode(mode);
}

/** What delta's cost and output depend on: its algorithm, and for a patch (compressed in delta) the level too. */
export function deltaKey(mode: Mode): string {
  return mode.delta === 'patch' ? modeKey(mode) : mode.delta;
}

/**
 * Blocks per second a mode achieves. Stages run in their own processes, so each bounds throughput
 * alone (delta has one instance, compress has `compressWorkers`), and together they share the spare
 * cores: processing = min(1/P_delta, N/P_compress, cores/P_total).
 */
export function predict(cost: ModeCost, fixedCpuMsPerBlock: number, c: Conditions): Prediction {
  const perSec = (cpuMs: number, cores: number): number => (cpuMs > 0 ? (cores * 1000) / cpuMs : Number.POSITIVE_INFINITY);
  const total = fixedCpuMsPerBlock + cost.deltaCpuMsPerBlock + cost.compressCpuMsPerBlock + (cost.overheadCpuMsPerBlock ?? 0);
  const processing = Math.min(
    perSec(cost.deltaCpuMsPerBlock, 1),
    perSec(cost.compressCpuMsPerBlock, Math.max(1, c.compressWorkers)),
    perSec(total, Math.max(0.05, c.spareCores)),
  );
  const network = c.bandwidthBps > 0 ? c.bandwidthBps / (Math.max(cost.ratio, 1e-6) * BLOCK_BITS) : Number.POSITIVE_INFINITY;
  return { mode: cost.mode, processingBlocksPerSec: processing, networkBlocksPerSec: network, blocksPerSec: softMin(processing, network) };
}

/**
 * Throughput of processing feeding the link: min(processing, network) where one is well below the
 * other, less where they are close. Per-chunk cost varies with the pages and the queues between
 * stages are short, so with both near their limit each waits on the other at times (plain min chose
 * a costly mode for a slightly better ratio). (P^-k + N^-k)^(-1/k), k = 3: at P = N, 0.79 of
 * either; at P = 2N, 0.96 of N.
 */
export function softMin(processing: number, network: number): number {
  if (!Number.isFinite(processing)) return network;
  if (!Number.isFinite(network)) return processing;
  return (processing ** -SOFT_MIN_K + network ** -SOFT_MIN_K) ** (-1 / SOFT_MIN_K);
}

const SOFT_MIN_K = 3;

export function rank(costs: ModeCost[], fixedCpuMsPerBlock: number, c: Conditions): Prediction[] {
  return costs.map((m) => predict(m, fixedCpuMsPerBlock, c)).sort((a, b) => b.blocksPerSec - a.blocksPerSec);
}

/**
 * The mode to take from a ranking: of those within `tieShare` of the first, the best that costs at
 * most `tieCpuFactor` the CPU of the cheapest of them (CPU is headroom for a faster link or another
 * load on the cloudlet, and the cloudlet's VMs keep it).
 */
export function pick(ranked: readonly Prediction[], ties: Pick<TunerConfig, 'tieShare' | 'tieCpuFactor'> = DEFAULT_TUNER_CONFIG): Prediction | undefined {
  const first = ranked[0];
  if (!first) return undefined;
  const tied: Prediction[] = [];
  for (const p of ranked) {
    if (p.blocksPerSec < first.blocksPerSec * (1 - ties.tieShare)) break;
    tied.push(p);
  }
  const cheapest = tied.reduce((a, p) => (p.processingBlocksPerSec > a.processingBlocksPerSec ? p : a));
  return tied.find((p) => p.processingBlocksPerSec * ties.tieCpuFactor >= cheapest.processingBlocksPerSec) ?? cheapest;
}
