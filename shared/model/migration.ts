/** What a migration is (its descriptor) and what happens to it (its events), shared by all actors. */
import { MalformedMessageError } from './errors.js';
import { isMode, type Mode } from './mode.js';
import type { VmDescription } from '../vm/qemu.js';
import type { RamBlockPlacement } from '../vm/ram-image.js';
import { amount, count, counters, digests, object, parseJson, text } from './validate.js';
import { CAPTURED_EVENT_OVERHEAD_BYTES, MAX_DEVICE_STATE_CHARS, NATS_MAX_PAYLOAD_BYTES } from '../config/limits.js';

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
  /** W3C traceparent of the migration's root span: every actor's spans join its trace */
  traceparent?: string;
  /** chunks whose seq is a multiple of this get spans at every stage (the rest none) */
  traceEveryChunks?: number;
  /** a running VM: iterative pre-copy rounds, then stop-and-copy and a resume at the destination */
  live?: LiveVm;
}

/** A running QEMU guest handed off live (see services/capture/live.ts). */
export interface LiveVm {
  /** the VM's QMP socket on the source */
  qmpSocket: string;
  /** the base snapshot's device state, which the final device state is encoded against */
  baseDeviceState: string;
  /** stop when the last round is predicted to fit this (default 300 ms) */
  downtimeMs: number;
  maxRounds: number;
  /** RAM in a shared file that capture reads: the machine both ends build from the project's command line */
  vm?: VmDescription;
  /** RAM from QEMU's own migration stream (any RAM backing): the source's own machine, which the destination runs */
  machine?: SourceMachine;
  /** with `machine`: false leaves the guest unthrottled (neither QEMU's auto-converge nor a CPU quota) */
  autoConverge?: boolean;
}

/** The source's own QEMU machine: what a destination must run to load its state. */
export interface SourceMachine {
  /** the source QEMU's command line, program first (read from the process behind its QMP socket) */
  argv: string[];
  /** the base's RAM blocks as its memory image places them: the live stream must list the same */
  ramBlocks: RamBlockPlacement[];
}

/** One pre-copy round as the source saw it, and what the round policy decided after it. */
export interface RoundRecord {
  round: number;
  dirtyPages: number;
  /** capture start to everything delivered at the destination */
  seconds: number;
  decision: string;
  predictedDowntimeMs?: number;
}

/** most dedup partitions and pages per chunk a descriptor may ask for */
export const MAX_PARTS = 64;
export const MAX_CHUNK_PAGES = 4096;

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
    // bounded: capture and dedup size their work by these
    Number.isInteger(d.parts) &&
    (d.parts as number) >= 1 &&
    (d.parts as number) <= MAX_PARTS &&
    Number.isInteger(d.chunkPages) &&
    (d.chunkPages as number) >= 1 &&
    (d.chunkPages as number) <= MAX_CHUNK_PAGES &&
    typeof d.bandwidthCapBps === 'number' &&
    d.bandwidthCapBps >= 0 &&
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
  /** live: the destination's VM is loaded and waits for the source's go (or why not) */
  vmReady?: boolean;
  vmError?: string;
  /** live: when the destination's VM ran again (epoch ms) */
  resumedAtMs?: number;
}

export type MigrationEvent =
  | { type: 'start' }
  | { type: 'accepted'; destinationBaseHashes: ImageDigests }
  | { type: 'refused'; reason: string }
  /** capture finished round `round`: `slices` chunk slices in all, source image hashes at stop */
  | {
      type: 'captured';
      round: number;
      slices: number;
      imageHashes: ImageDigests;
      dirtyPages: number;
      scannedBytes: number;
      /** the last round: the destination verifies after it (absent: true) */
      final?: boolean;
      /** live: the device state at stop, zstd against the base's (base64) */
      deviceState?: string;
      /** live: when the source VM was stopped (epoch ms) */
      stoppedAtMs?: number;
      rounds?: RoundRecord[];
    }
  | { type: 'result'; result: RebuildResult }
  /** the tuner switched mode: what it measured and predicted */
  | { type: 'tuned'; decision: TunerDecision }
  /** `committed`: the destination was told to resume the VM before the link failed (its state is unknown) */
  | { type: 'failed'; stage: string; reason: string; committed?: boolean };

/**
 * An adaptive migration's first chunks: capture publishes them in ADAPTIVE_START_MODE, then
 * waits for the tuner's first `tuned` event while the tuner looks. A few chunks keep the link busy
 * during the look; with every chunk held it idles, and with all of them let go a slow link's queue
 * fills in the start mode before the look can choose a stronger one.
 */
export const HEAD_START_CHUNKS = 3;

/** A tuner decision as it travels in events and summaries (blocks/s are 4 KiB blocks of dedup output). */
export interface TunerDecision {
  /** when the tuner decided, from when it followed the migration */
  atSeconds: number;
  /** how long this look waited for the ratio probe before it decided (the first look only, where it waited) */
  probeWaitSeconds?: number;
  from: string;
  to: string;
  /** bandwidth the prediction assumed: the measured one, raised when the link was not the bottleneck */
  bandwidthBps: number;
  /** bandwidth measured from the receiver's ACKs (0: none yet) */
  measuredBandwidthBps: number;
  /** what the sender's probe of the link found before chunks flowed */
  probedBandwidthBps?: number;
  spareCores: number;
  /** compress workers running */
  compressWorkers: number;
  /** of which the tuner wants this many in use from now on */
  compressWorkersInUse?: number;
  /** CPU per block no stage reports (bus, sender, TLS), measured over the last intervals */
  overheadCpuMsPerBlock?: number;
  predictedCurrentBlocksPerSec: number;
  predictedChosenBlocksPerSec: number;
}

/** A rebuild result from a peer or the bus, checked field by field. */
export function parseRebuildResult(value: unknown, what: string): RebuildResult {
  const o = object(value, what);
  if (typeof o.verified !== 'boolean') throw new MalformedMessageError(`${what}: verified is not a boolean`);
  const rebuilt = object(o.rebuiltHashes, `${what}: rebuiltHashes`);
  return {
    verified: o.verified,
    ...(o.reason !== undefined ? { reason: text(o.reason, `${what}: reason`) } : {}),
    rebuiltHashes: { memory: text(rebuilt.memory, `${what}: memory hash`, 128), disk: text(rebuilt.disk, `${what}: disk hash`, 128) },
    pagesWritten: count(o.pagesWritten, `${what}: pagesWritten`),
    slices: count(o.slices, `${what}: slices`),
    duplicateSlices: count(o.duplicateSlices, `${what}: duplicateSlices`),
    rebuildSeconds: amount(o.rebuildSeconds, `${what}: rebuildSeconds`),
    ...(o.vmReady !== undefined ? { vmReady: o.vmReady === true } : {}),
    ...(o.vmError !== undefined ? { vmError: text(o.vmError, `${what}: vmError`) } : {}),
    ...(o.resumedAtMs !== undefined ? { resumedAtMs: amount(o.resumedAtMs, `${what}: resumedAtMs`) } : {}),
  };
}

function parseDecision(value: unknown): TunerDecision {
  const o = object(value, 'tuned event: decision');
  const n = (k: keyof TunerDecision): number => amount(o[k], `tuned event: ${k}`);
  return {
    atSeconds: n('atSeconds'),
    ...(o.probeWaitSeconds !== undefined ? { probeWaitSeconds: n('probeWaitSeconds') } : {}),
    from: text(o.from, 'tuned event: from', 64),
    to: text(o.to, 'tuned event: to', 64),
    bandwidthBps: n('bandwidthBps'),
    measuredBandwidthBps: n('measuredBandwidthBps'),
    ...(o.probedBandwidthBps !== undefined ? { probedBandwidthBps: n('probedBandwidthBps') } : {}),
    spareCores: n('spareCores'),
    compressWorkers: n('compressWorkers'),
    ...(o.compressWorkersInUse !== undefined ? { compressWorkersInUse: n('compressWorkersInUse') } : {}),
    ...(o.overheadCpuMsPerBlock !== undefined ? { overheadCpuMsPerBlock: n('overheadCpuMsPerBlock') } : {}),
    predictedCurrentBlocksPerSec: n('predictedCurrentBlocksPerSec'),
    predictedChosenBlocksPerSec: n('predictedChosenBlocksPerSec'),
  };
}

/** An event off the bus, checked field by field for its type. */
export function parseEvent(bytes: Uint8Array): MigrationEvent {
  const o = object(parseJson(Buffer.from(bytes).toString('utf8'), 'migration event'), 'migration event');
  switch (o.type) {
    case 'start':
      return { type: 'start' };
    case 'accepted':
      return { type: 'accepted', destinationBaseHashes: digests(o.destinationBaseHashes, 'accepted event') };
    case 'refused':
      return { type: 'refused', reason: text(o.reason, 'refused event: reason') };
    case 'captured':
      return {
        type: 'captured',
        round: count(o.round, 'captured event: round', 65534),
        slices: count(o.slices, 'captured event: slices'),
        imageHashes: digests(o.imageHashes, 'captured event'),
        dirtyPages: count(o.dirtyPages, 'captured event: dirtyPages'),
        scannedBytes: count(o.scannedBytes, 'captured event: scannedBytes'),
        ...(o.final !== undefined ? { final: o.final === true } : {}),
        ...(o.deviceState !== undefined ? { deviceState: text(o.deviceState, 'captured event: deviceState', MAX_DEVICE_STATE_CHARS) } : {}),
        ...(o.stoppedAtMs !== undefined ? { stoppedAtMs: amount(o.stoppedAtMs, 'captured event: stoppedAtMs') } : {}),
        ...(Array.isArray(o.rounds) ? { rounds: o.rounds as RoundRecord[] } : {}),
      };
    case 'result':
      return { type: 'result', result: parseRebuildResult(o.result, 'result event') };
    case 'tuned':
      return { type: 'tuned', decision: parseDecision(o.decision) };
    case 'failed':
      return { type: 'failed', stage: text(o.stage, 'failed event: stage', 64), reason: text(o.reason, 'failed event: reason'), ...(o.committed === true ? { committed: true } : {}) };
    default:
      throw new MalformedMessageError(`migration event: unknown type ${JSON.stringify(o.type)?.slice(0, 40)}`);
  }
}

/** Statistics off the bus, checked field by field (they feed summaries and the tuner). */
export function parseStats(bytes: Uint8Array | string): StageStats {
  const o = object(parseJson(typeof bytes === 'string' ? bytes : Buffer.from(bytes).toString('utf8'), 'stage statistics'), 'stage statistics');
  if (!isMode(o.mode)) throw new MalformedMessageError('stage statistics: mode is not a mode');
  const n = (k: 'round' | 'seq' | 'part' | 'pages' | 'bytesIn' | 'bytesOut'): number => count(o[k], `stage statistics: ${k}`);
  return {
    stage: text(o.stage, 'stage statistics: stage', 64),
    instance: text(o.instance, 'stage statistics: instance', 256),
    migrationId: text(o.migrationId, 'stage statistics: migrationId', 128),
    round: n('round'),
    seq: n('seq'),
    part: n('part'),
    pages: n('pages'),
    bytesIn: n('bytesIn'),
    bytesOut: n('bytesOut'),
    cpuMs: amount(o.cpuMs, 'stage statistics: cpuMs'),
    wallMs: amount(o.wallMs, 'stage statistics: wallMs'),
    mode: o.mode,
    ...(o.next !== undefined ? { next: text(o.next, 'stage statistics: next', 64) } : {}),
    ...(o.counts !== undefined ? { counts: counters(o.counts, 'stage statistics: counts') } : {}),
  };
}

/** A device state larger than one captured event carries: refused at the source, before it is sent. */
export class DeviceStateTooLargeError extends Error {
  constructor(readonly deviceStateChars: number) {
    super(
      `device state of ${deviceStateChars} bytes (base64 of its patch against the base's) is more than one captured event carries: ` +
        `${MAX_DEVICE_STATE_CHARS} bytes (the bus's max_payload of ${NATS_MAX_PAYLOAD_BYTES} less ${CAPTURED_EVENT_OVERHEAD_BYTES} for the event's other fields)`,
    );
    this.name = 'DeviceStateTooLargeError';
  }
}

export function encodeEvent(event: MigrationEvent): Uint8Array {
  if (event.type === 'captured' && event.deviceState !== undefined && event.deviceState.length > MAX_DEVICE_STATE_CHARS) throw new DeviceStateTooLargeError(event.deviceState.length);
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
