/**
 * One capture round: read the current images page by page, emit the pages that differ from the
 * reference (round 0: the base; later rounds of a live handoff: the round before) as chunks into
 * dedup's partitions, and give the image digests as they were read.
 */
import { open } from 'node:fs/promises';
import { hostname } from 'node:os';
import { loadBaseIndex } from '../../shared/image/base-index.js';
import { publishStats, publishWork, waitMigrationBacklog, type Bus } from '../../shared/bus/bus.js';
import { migrationBacklogMaxMessages } from '../../shared/config/limits.js';
import { chunkKey, type Chunk } from '../../shared/model/chunk.js';
import { encodeChunk } from '../../shared/wire/chunk-codec.js';
import { BadImageError, BaseMismatchError } from '../../shared/model/errors.js';
import type { Logger } from '../../shared/telemetry/log.js';
import type { ImageDigests, MigrationDescriptor, StageStats } from '../../shared/model/migration.js';
import type { ActorContext } from '../../shared/actor/shell.js';
import type { Span } from '@opentelemetry/api';
import { PAGE_SIZE, digestOfPageHashes, newImageDigest, type ImageId } from '../../shared/image/pages.js';
import { workSubject } from '../../shared/bus/subjects.js';
import { chunkTraced, headersFor, startSpan, traceparentOf } from '../../shared/telemetry/telemetry.js';
import { ChunkBuilder, changedPagesOf, dirtyPagesOf, type PageRecord } from './core.js';

/** the images are read this much at a time (a whole number of page groups) */
const READ_BLOCK_BYTES = 4 * 1024 * 1024;
/** publishes awaiting their JetStream ack at once: overlaps reading with the bus */
const MAX_PUBLISHES_IN_FLIGHT = 8;
/** the migration's backlog is looked at once every this many publishes (it costs a request per stream) */
const BACKLOG_CHECK_EVERY = 4;

export interface RoundResult {
  round: number;
  slices: number;
  dirtyPages: number;
  scannedBytes: number;
  imageHashes: ImageDigests;
  /** reading, hashing and publishing the round */
  seconds: number;
}

/** A live handoff's state between rounds. */
export interface LiveImages {
  /** every page's hashes as last read: round 0 fills them, later rounds compare and update */
  records: [PageRecord, PageRecord];
  /** the images mapped (later rounds hash them in place), where mmap is available */
  views: [Buffer | undefined, Buffer | undefined];
}

/** Chunks publish freely up to `afterChunks`; the next waits for `open` (an adaptive migration's first look). */
export interface CaptureGate {
  afterChunks: number;
  open: Promise<unknown>;
  /** ... and the first waits for `open` this long from the round's start: a look that comes soon chooses the head start's mode too */
  headStartWaitMs?: number;
}

/** Where a round's per-chunk statistics go: the capture actor's `ctx.publishStats`. */
export type PublishStats = ActorContext['publishStats'];

/** Outside the actor (a test driving one round): statistics stamped as this process's capture. */
function publishAsCapture(bus: Bus): PublishStats {
  const instance = `${hostname()}:${process.pid}`;
  return (stats) => publishStats(bus, { stage: 'capture', instance, ...stats });
}

/**
 * Publishes one round's chunk slices into dedup's partitions: a few JetStream acks awaited at once
 * (overlapping the reading with the bus), the gate, traced chunks, and each chunk's statistics.
 */
export class RoundPublisher {
  private readonly inFlight = new Set<Promise<void>>();
  // a publish that fails while not awaited fails the round at the next publish or at its end
  private failed: { reason: unknown } | undefined;
  private readonly headStart: Promise<unknown> | undefined;
  private published = 0;
  /** a chunk's cost is everything since the previous one: reading and hashing its pages too */
  private since = { wallMs: performance.now(), cpu: process.cpuUsage() };

  constructor(
    private readonly bus: Bus,
    private readonly d: MigrationDescriptor,
    private readonly round: number,
    private readonly span: Span,
    private gate: CaptureGate | undefined,
    private readonly report: PublishStats,
  ) {
    this.headStart = gate?.headStartWaitMs ? Promise.race([gate.open, new Promise((resolve) => setTimeout(resolve, gate.headStartWaitMs).unref())]) : undefined;
  }

  /** the next chunk's cost is counted from now */
  restartClock(): void {
    this.since = { wallMs: performance.now(), cpu: process.cpuUsage() };
  }

  async publish(chunk: Chunk): Promise<void> {
    const { d, round } = this;
    if (this.gate && chunk.seq >= this.gate.afterChunks) {
      await this.gate.open;
      this.gate = undefined;
    } else if (this.headStart) await this.headStart;
    // this migration's chunks wait here, not in the streams other migrations share
    if (++this.published % BACKLOG_CHECK_EVERY === 0) await waitMigrationBacklog(this.bus, d.migrationId, migrationBacklogMaxMessages());
    // a traced chunk starts its chain of spans here (one per stage it passes)
    let traceparent: string | undefined;
    if (d.traceparent && chunkTraced(chunk.seq, d.traceEveryChunks)) {
      const chunkSpan = startSpan('capture chunk', traceparentOf(this.span), { 'handoff.seq': chunk.seq, 'handoff.part': chunk.part, 'handoff.round': round, 'handoff.pages': chunk.pageIndex.length, 'handoff.actor': 'capture' });
      traceparent = traceparentOf(chunkSpan);
      chunkSpan.end();
    }
    const p = publishWork(this.bus, workSubject('dedup', d.migrationId, chunk.part), encodeChunk(chunk), `${d.migrationId}.capture.${chunkKey(chunk)}`, headersFor(traceparent))
      .catch((reason: unknown) => void (this.failed ??= { reason }))
      .finally(() => this.inFlight.delete(p));
    this.inFlight.add(p);
    if (this.inFlight.size >= MAX_PUBLISHES_IN_FLIGHT) await Promise.race(this.inFlight);
    if (this.failed) throw this.failed.reason;
  }

  /** The builder's pending pages as one chunk's slices, published, with the chunk's statistics. */
  async flush(builder: ChunkBuilder, scannedBytes: number): Promise<void> {
    const pages = builder.pending;
    const slices = builder.take();
    for (const slice of slices) await this.publish(slice);
    const used = process.cpuUsage(this.since.cpu);
    const startedMs = this.since.wallMs;
    this.restartClock();
    const stats: Omit<StageStats, 'stage' | 'instance'> = {
      migrationId: this.d.migrationId,
      round: this.round,
      seq: slices[0]!.seq,
      part: 0,
      pages,
      bytesIn: pages * PAGE_SIZE,
      bytesOut: pages * PAGE_SIZE,
      cpuMs: (used.user + used.system) / 1000,
      wallMs: performance.now() - startedMs,
      mode: slices[0]!.mode,
      counts: { scannedBytes, slices: slices.length },
    };
    this.report(stats);
  }

  /** Waits for every publish's ack; throws if one failed. */
  async settle(): Promise<void> {
    await Promise.all(this.inFlight);
    if (this.failed) throw this.failed.reason;
  }
}

/** Which images a round reads: both, or the disk alone (a stream capture takes memory from QEMU's stream). */
export interface RoundImages {
  images?: readonly ImageId[];
  /** the round's first chunk seq (the chunks of memory taken from the stream come before) */
  firstSeq?: number;
}

/**
 * Captures round `round` (`live`: of a live handoff, whose later rounds compare with the round
 * before; `gate`: hold chunks past the first few until it opens).
 */
export async function captureRound(
  bus: Bus,
  d: MigrationDescriptor,
  round: number,
  log: Logger,
  live?: LiveImages,
  gate?: CaptureGate,
  report: PublishStats = publishAsCapture(bus),
  which: RoundImages = {},
): Promise<RoundResult> {
  const records = live?.records;
  if (round > 0 && !records) throw new Error('a later round needs the hashes of the round before');
  const started = performance.now();
  const span = startSpan('capture', d.traceparent, { 'handoff.migration': d.migrationId, 'handoff.actor': 'capture', 'handoff.round': round });
  const publisher = new RoundPublisher(bus, d, round, span, gate, report);
  let seq = which.firstSeq ?? 0;
  let dirtyPages = 0;
  let scannedBytes = 0;
  const imageHashes: ImageDigests = { memory: '', disk: '' };
  try {
    for (const image of which.images ?? ([0, 1] as ImageId[])) {
      const pair = image === 0 ? d.memory : d.disk;
      const name = image === 0 ? 'memory' : 'disk';
      const record = records?.[image];
      // round 0 hashes every page and keeps them: it reads a private copy; later rounds copy what changed
      const view = round > 0 ? live?.views[image] : undefined;
      const base = round === 0 ? await loadBaseIndex(pair.base) : undefined;
      if (base && base.contentHash !== pair.baseHash) throw new BaseMismatchError(`base ${name} ${pair.base} changed: content hash ${base.contentHash}, migration expects ${pair.baseHash}`);
      const builder = new ChunkBuilder({ migrationId: d.migrationId, round, image, parts: d.parts }, d.chunkPages, seq);
      const digest = newImageDigest();
      const fh = await open(pair.current, 'r');
      try {
        const size = (await fh.stat()).size;
        if (size !== pair.bytes) throw new BadImageError(`${name} image ${pair.current} is ${size} bytes now, ${pair.bytes} when the migration started`);
        const block = Buffer.allocUnsafe(READ_BLOCK_BYTES);
        publisher.restartClock();
        const flush = (): Promise<void> => publisher.flush(builder, scannedBytes);
        for (let offset = 0; offset < size; ) {
          const want = Math.min(READ_BLOCK_BYTES, size - offset);
          const bytesRead = view ? want : (await fh.read(block, 0, want, offset)).bytesRead;
          if (bytesRead !== want) throw new BadImageError(`${name} image ${pair.current} was truncated while it was read (at byte ${offset + bytesRead})`);
          const data = view ? view.subarray(offset, offset + want) : block.subarray(0, bytesRead);
          const first = offset / PAGE_SIZE;
          const dirty = base ? dirtyPagesOf(data, first, base.hashes, digest, record) : changedPagesOf(data, first, record!);
          for (const page of dirty) {
            dirtyPages++;
            if (builder.add(page)) await flush();
          }
          offset += bytesRead;
          scannedBytes += bytesRead;
        }
        if (builder.pending > 0) await flush();
      } finally {
        await fh.close();
      }
      seq = builder.nextSeq;
      // later rounds hashed only what changed: the digest comes from the hashes kept up to date
      imageHashes[name] = base ? digest.digest('hex') : digestOfPageHashes(record!.strong);
    }
    await publisher.settle();
  } finally {
    span.setAttributes({ 'handoff.dirty_pages': dirtyPages, 'handoff.scanned_bytes': scannedBytes });
    span.end();
  }
  log.info('captured', { round, chunks: seq, dirtyPages, scannedBytes });
  return { round, slices: (seq - (which.firstSeq ?? 0)) * d.parts, dirtyPages, scannedBytes, imageHashes, seconds: (performance.now() - started) / 1000 };
}
