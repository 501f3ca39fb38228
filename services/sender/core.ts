/**
 * The sender's pure core: how much to keep in flight on the link, how large the wire queue should
 * be, whether the link is the bottleneck, and the statistics each acknowledged chunk reports.
 */
import type { MigrationDescriptor, StageStats } from '../../shared/model/migration.js';
import type { Hello } from '../../shared/wire/frames.js';

/** A statistics message before the shell stamps it with the actor's name and instance. */
export type SenderStats = Omit<StageStats, 'stage' | 'instance'>;

const MIN_IN_FLIGHT_BYTES = 1024 * 1024;
const MAX_IN_FLIGHT_BYTES = 8 * 1024 * 1024;

/**
 * Unacknowledged bytes allowed on the link: about a second of the measured bandwidth, enough to
 * keep the pipe full without running far ahead of it (a chunk in flight can no longer change mode).
 */
export function inFlightLimitBytes(bandwidthBps: number | undefined): number {
  if (!bandwidthBps) return MIN_IN_FLIGHT_BYTES * 2;
  return Math.min(MAX_IN_FLIGHT_BYTES, Math.max(MIN_IN_FLIGHT_BYTES, bandwidthBps / 8));
}

/**
 * The wire queue's new size for the links' total bandwidth (about a second of it, within `bounds`),
 * or undefined when it stays: it changes only when the target is 1.5 times off, so it does not flap.
 */
export function wireQueueResizeBytes(totalBandwidthBps: number, currentMaxBytes: number, bounds: { minBytes: number; maxBytes: number }): number | undefined {
  if (totalBandwidthBps <= 0) return undefined;
  const target = Math.min(bounds.maxBytes, Math.max(bounds.minBytes, totalBandwidthBps / 8));
  return target > currentMaxBytes * 1.5 || target < currentMaxBytes / 1.5 ? target : undefined;
}

type SaturationState = 'idle' | 'link' | 'busy';

/**
 * Is the link the bottleneck? The share of recent time the sender waited for ACKs with the window
 * full (link-bound) against time it waited for chunks (pipeline-bound), decaying over ~2 s: ACKs
 * measure the link's capacity only in the first case, else only a lower bound of it.
 */
export class Saturation {
  private state: SaturationState = 'busy';
  private sinceMs: number;
  private linkMs = 0;
  private idleMs = 0;

  constructor(private readonly nowMs: () => number = () => performance.now()) {
    this.sinceMs = nowMs();
  }

  private switchTo(state: SaturationState): void {
    const now = this.nowMs();
    const spentMs = now - this.sinceMs;
    const decay = Math.exp(-spentMs / 2000);
    this.linkMs = this.linkMs * decay + (this.state === 'link' ? spentMs : 0);
    this.idleMs = this.idleMs * decay + (this.state === 'idle' ? spentMs : 0);
    this.state = state;
    this.sinceMs = now;
  }

  /** waiting for the pipeline's next chunk */
  idle(): void {
    this.switchTo('idle');
  }
  /** working on a chunk */
  busy(): void {
    this.switchTo('busy');
  }
  /** waiting for ACKs with the window full */
  linkBound(): void {
    this.switchTo('link');
  }

  /** 0..1; 1 before anything was waited for */
  get linkBoundShare(): number {
    this.switchTo(this.state);
    const total = this.linkMs + this.idleMs;
    return total > 0 ? this.linkMs / total : 1;
  }
}

/** The HELLO that opens migration `d`'s link; `linkTraceparent` when the migration is traced. */
export function helloFor(d: MigrationDescriptor, linkTraceparent: string | undefined): Hello {
  return {
    migrationId: d.migrationId,
    baseHashes: { memory: d.memory.baseHash, disk: d.disk.baseHash },
    bytes: { memory: d.memory.bytes, disk: d.disk.bytes },
    ...(linkTraceparent ? { traceparent: linkTraceparent, traceEveryChunks: d.traceEveryChunks ?? 1 } : {}),
    ...(d.live?.vm ? { vm: d.live.vm } : {}),
    ...(d.live?.machine ? { machine: d.live.machine } : {}),
  };
}

const NO_MODE = { delta: 'none', compressor: 'none', level: 0 } as const;

export interface AckedChunk {
  migrationId: string;
  /** the wire stream's sequence number of the chunk's message */
  streamSeq: number;
  /** the encoded chunk's size, as it came from the wire queue */
  bytesIn: number;
  /** one copy of its frame */
  frameBytes: number;
  /** copies written (more than 1 after a drop or a corrupted frame) */
  sends: number;
  cpuMs: number;
  wallMs: number;
}

/** The statistics of one chunk the receiver acknowledged; `reconnects`: since the previous chunk's. */
export function ackedChunkStats(chunk: AckedChunk, reconnects: number): SenderStats {
  return {
    migrationId: chunk.migrationId,
    round: 0,
    seq: chunk.streamSeq,
    part: 0,
    pages: 0,
    bytesIn: chunk.bytesIn,
    bytesOut: chunk.frameBytes,
    cpuMs: chunk.cpuMs,
    wallMs: chunk.wallMs,
    mode: { ...NO_MODE },
    counts: {
      // bytes this chunk cost beyond one copy (resent after a drop or a corrupted frame)
      resentBytes: (chunk.sends - 1) * chunk.frameBytes,
      reconnects,
    },
  };
}

/**
 * Why a live handoff's commit failed. The destination saying it could not resume is an answer (its
 * VM does not run); a lost link is not: the destination may be running the VM, so the failure is
 * marked committed and the source VM stays stopped.
 */
export function commitFailure(answered: boolean, reason: string): { log: string; reason: string; committed?: true } {
  return answered
    ? { log: 'destination could not resume the VM', reason }
    : { log: 'destination told to resume, then lost: its VM state is unknown', reason: `link lost after the destination was told to resume the VM (${reason}): the source VM stays stopped`, committed: true };
}
