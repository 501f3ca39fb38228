/**
 * Capture actor: when a destination has accepted a migration, read its current images page by page,
 * emit the pages that differ from base as chunks into dedup's partitions, then announce the count.
 */
import { open } from 'node:fs/promises';
import { hostname } from 'node:os';
import { loadBaseIndex } from '../../shared/base-index.js';
import { connectBus, ensureEventConsumer, publishEvent, publishStats, publishWork, type Bus } from '../../shared/bus.js';
import { chunkKey, type Chunk } from '../../shared/chunk.js';
import { encodeChunk } from '../../shared/codec.js';
import { BadImageError, BaseMismatchError, errorMessage } from '../../shared/errors.js';
import type { RunningService } from '../../shared/stage.js';
import { createLogger, type Logger } from '../../shared/log.js';
import { parseEvent, type ImageDigests, type MigrationDescriptor, type StageStats } from '../../shared/migration.js';
import { PAGE_SIZE, newImageDigest, type ImageId } from '../../shared/pages.js';
import { DescriptorCache } from '../../shared/registry.js';
import { STREAMS, workSubject } from '../../shared/subjects.js';
import { chunkTraced, headersFor, startSpan, traceparentOf } from '../../shared/telemetry.js';
import { ChunkBuilder, dirtyPagesOf } from './core.js';

const READ_BLOCK_BYTES = 4 * 1024 * 1024;
/** publishes awaiting their JetStream ack at once: overlaps reading with the bus */
const MAX_PUBLISHES_IN_FLIGHT = 8;

export interface CaptureResult {
  slices: number;
  dirtyPages: number;
  scannedBytes: number;
  imageHashes: ImageDigests;
}

export async function captureMigration(bus: Bus, d: MigrationDescriptor, log: Logger): Promise<CaptureResult> {
  const instance = `${hostname()}:${process.pid}`;
  const inFlight = new Set<Promise<void>>();
  const span = startSpan('capture', d.traceparent, { 'handoff.migration': d.migrationId, 'handoff.actor': 'capture' });
  const publish = async (chunk: Chunk): Promise<void> => {
    // a traced chunk starts its chain of spans here (one per stage it passes)
    let traceparent: string | undefined;
    if (d.traceparent && chunkTraced(chunk.seq, d.traceEveryChunks)) {
      const chunkSpan = startSpan('capture chunk', traceparentOf(span), { 'handoff.seq': chunk.seq, 'handoff.part': chunk.part, 'handoff.pages': chunk.pageIndex.length, 'handoff.actor': 'capture' });
      traceparent = traceparentOf(chunkSpan);
      chunkSpan.end();
    }
    const p = publishWork(bus, workSubject('dedup', d.migrationId, chunk.part), encodeChunk(chunk), `${d.migrationId}.capture.${chunkKey(chunk)}`, headersFor(traceparent)).finally(() =>
      inFlight.delete(p),
    );
    inFlight.add(p);
    if (inFlight.size >= MAX_PUBLISHES_IN_FLIGHT) await Promise.race(inFlight);
  };
  let seq = 0;
  let dirtyPages = 0;
  let scannedBytes = 0;
  const imageHashes: ImageDigests = { memory: '', disk: '' };
  for (const image of [0, 1] as ImageId[]) {
    const pair = image === 0 ? d.memory : d.disk;
    const name = image === 0 ? 'memory' : 'disk';
    const base = await loadBaseIndex(pair.base);
    if (base.contentHash !== pair.baseHash) throw new BaseMismatchError(`base ${name} ${pair.base} changed: content hash ${base.contentHash}, migration expects ${pair.baseHash}`);
    const builder = new ChunkBuilder({ migrationId: d.migrationId, round: 0, image, parts: d.parts }, d.chunkPages, seq);
    const digest = newImageDigest();
    const fh = await open(pair.current, 'r');
    try {
      const size = (await fh.stat()).size;
      if (size !== pair.bytes) throw new BadImageError(`${name} image ${pair.current} is ${size} bytes now, ${pair.bytes} when the migration started`);
      const block = Buffer.allocUnsafe(READ_BLOCK_BYTES);
      // a chunk's cost is everything since the previous one: reading and hashing its pages too
      let since = { wallMs: performance.now(), cpu: process.cpuUsage() };
      const flush = async (): Promise<void> => {
        const pages = builder.pending;
        const slices = builder.take();
        for (const slice of slices) await publish(slice);
        const used = process.cpuUsage(since.cpu);
        const started = since.wallMs;
        since = { wallMs: performance.now(), cpu: process.cpuUsage() };
        const stats: StageStats = {
          stage: 'capture',
          instance,
          migrationId: d.migrationId,
          round: 0,
          seq: slices[0]!.seq,
          part: 0,
          pages,
          bytesIn: pages * PAGE_SIZE,
          bytesOut: pages * PAGE_SIZE,
          cpuMs: (used.user + used.system) / 1000,
          wallMs: performance.now() - started,
          mode: slices[0]!.mode,
          counts: { scannedBytes, slices: slices.length },
        };
        publishStats(bus, stats);
      };
      for (let offset = 0; offset < size; ) {
        const want = Math.min(READ_BLOCK_BYTES, size - offset);
        const { bytesRead } = await fh.read(block, 0, want, offset);
        if (bytesRead !== want) throw new BadImageError(`${name} image ${pair.current} was truncated while it was read (at byte ${offset + bytesRead})`);
        const data = block.subarray(0, bytesRead);
        for (const page of dirtyPagesOf(data, offset / PAGE_SIZE, base.hashes, digest)) {
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
    imageHashes[name] = digest.digest('hex');
  }
  await Promise.all(inFlight);
  span.setAttributes({ 'handoff.dirty_pages': dirtyPages, 'handoff.scanned_bytes': scannedBytes });
  span.end();
  log.info('captured', { chunks: seq, dirtyPages, scannedBytes });
  return { slices: seq * d.parts, dirtyPages, scannedBytes, imageHashes };
}

/** The capture process: takes `accepted` events (each by one instance) and captures that migration. */
export async function runCaptureService(natsUrl: string): Promise<RunningService> {
  const log = createLogger({ stage: 'capture', instance: `${hostname()}:${process.pid}` });
  const bus = await connectBus(natsUrl, 'handoff-capture');
  // descriptors of ended migrations are dropped: a long-running actor does not grow
  const descriptors = await DescriptorCache.following(bus.migrations, () => undefined);
  const durable = await ensureEventConsumer(bus.jsm, 'capture', 'accepted');
  const consumer = await bus.js.consumers.get(STREAMS.events, durable);
  const messages = await consumer.consume({ max_messages: 1 });
  log.info('ready', { consumer: durable });
  const done = (async () => {
    for await (const m of messages) {
      const migrationId = m.subject.split('.')[2]!;
      const mlog = log.child({ migration: migrationId });
      const heartbeat = setInterval(() => m.working(), 10_000);
      try {
        parseEvent(m.data);
        const d = await descriptors.get(migrationId);
        mlog.info('capture started');
        const result = await captureMigration(bus, d, mlog);
        await publishEvent(bus, migrationId, { type: 'captured', round: 0, ...result });
      } catch (err) {
        mlog.error('capture failed', { reason: errorMessage(err) });
        await publishEvent(bus, migrationId, { type: 'failed', stage: 'capture', reason: errorMessage(err) }).catch(() => undefined);
      } finally {
        clearInterval(heartbeat);
        m.ack();
      }
    }
  })();
  return {
    ready: () => bus.connected(),
    done,
    stop: async () => {
      messages.stop();
      await done.catch(() => undefined);
      descriptors.stop();
      await bus.close();
    },
  };
}
