/** What a migration is (its descriptor) and what happens to it (its events), shared by all actors. */
import { isMode, type Mode } from './mode.js';

export interface ImagePair {
  /** path of the base image on the source cloudlet */
  base: string;
  /** path of the current image on the source cloudlet */
  current: string;
  /** content hash of the base (see base-index.ts) */
  baseHash: string;
  bytes: number;
}

export interface MigrationDescriptor {
  migrationId: string;
  createdAtMs: number;
  memory: ImagePair;
  disk: ImagePair;
  /** destination receiver, host:port */
  destination: string;
  /** dedup partitions: capture splits chunks by strong hash over this many dedup consumers */
  parts: number;
  chunkPages: number;
  /** sender's rate cap, 0 = none */
  bandwidthCapBps: number;
  /** the mode the migration starts in */
  mode: Mode;
  /** the tuner chooses the mode while it runs */
  adaptive?: boolean;
  /** how long the WAN link may stay lost before the migration fails (default 60 s) */
  linkDeadlineMs?: number;
}

export function isDescriptor(value: unknown): value is MigrationDescriptor {
  if (typeof value !== 'object' || value === null) return false;
  const d = value as Record<string, unknown>;
  const pair = (p: unknown): boolean =>
    typeof p === 'object' && p !== null && typeof (p as ImagePair).base === 'string' && typeof (p as ImagePair).current === 'string' && typeof (p as ImagePair).baseHash === 'string' && typeof (p as ImagePair).bytes === 'number';
  return (
    typeof d.migrationId === 'string' &&
    pair(d.memory) &&
    pair(d.disk) &&
    typeof d.destination === 'string' &&
    typeof d.parts === 'number' &&
    typeof d.chunkPages === 'number' &&
    typeof d.bandwidthCapBps === 'number' &&
    isMode(d.mode)
  );
}

export interface ImageDigests {
  memory: string;
  disk: string;
}

/** Result of rebuilding at the destination, as the receiver reports it. */
export interface RebuildResult {
  verified: boolean;
  reason?: string;
  /** sha256 of the rebuilt images */
  rebuiltHashes: ImageDigests;
  pagesWritten: number;
  slices: number;
  duplicateSlices: number;
  rebuildSeconds: number;
}

export type MigrationEvent =
  | { type: 'start' }
  | { type: 'accepted'; destinationBaseHashes: ImageDigests }
  | { type: 'refused'; reason: string }
  /** capture finished round `round`: `slices` chunk slices in all, source image hashes at stop */
  | { type: 'captured'; round: number; slices: number; imageHashes: ImageDigests; dirtyPages: number; scannedBytes: number }
  | { type: 'result'; result: RebuildResult }
  /** the tuner switched mode: what it measured and predicted */
  | { type: 'tuned'; decision: TunerDecision }
  | { type: 'failed'; stage: string; reason: string };

export type MigrationEventType = MigrationEvent['type'];

/** A tuner decision as it travels in events and summaries (blocks/s are 4 KiB blocks of dedup output). */
export interface TunerDecision {
  atSeconds: number;
  from: string;
  to: string;
  /** bandwidth the prediction assumed: the measured one, raised when the link was not the bottleneck */
  bandwidthBps: number;
  /** bandwidth measured from the receiver's ACKs */
  measuredBandwidthBps: number;
  spareCores: number;
  compressWorkers: number;
  predictedCurrentBlocksPerSec: number;
  predictedChosenBlocksPerSec: number;
}

const EVENT_TYPES: readonly string[] = ['start', 'accepted', 'refused', 'captured', 'result', 'failed', 'tuned'];

export function parseEvent(bytes: Uint8Array): MigrationEvent {
  const value: unknown = JSON.parse(Buffer.from(bytes).toString('utf8'));
  if (typeof value !== 'object' || value === null || !EVENT_TYPES.includes((value as { type: string }).type)) {
    throw new Error('not a migration event');
  }
  return value as MigrationEvent;
}

export function encodeEvent(event: MigrationEvent): Uint8Array {
  return Buffer.from(JSON.stringify(event));
}

/** Per-chunk statistics every stage publishes (summary now, the tuner later). */
export interface StageStats {
  stage: string;
  instance: string;
  migrationId: string;
  round: number;
  seq: number;
  part: number;
  pages: number;
  bytesIn: number;
  bytesOut: number;
  cpuMs: number;
  wallMs: number;
  mode: Mode;
  /** where the output went (a chunk's mode is final when this is 'wire') */
  next?: string;
  /** stage-specific counters (dedup kinds, delta kept, sender bandwidth ...) */
  counts?: Record<string, number>;
}
