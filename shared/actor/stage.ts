/**
 * The stage binding of the actor shell, for chunk actors (dedup, delta, compress): a durable pull
 * consumer shared by all instances of the stage, decode -> pure core -> publish outputs -> stats -> ack.
 */
import { chunkKey, type Chunk } from '../model/chunk.js';
import { decodeChunk, encodeChunk } from '../wire/chunk-codec.js';
import { MAX_DELIVERIES, ensureWorkConsumer, publishDeadLetter, publishWork, streamOf, type Bus, type JsMsg } from '../bus/bus.js';
import { MalformedMessageError, errorMessage } from '../model/errors.js';
import type { Logger } from '../telemetry/log.js';
import type { MigrationDescriptor, StageStats } from '../model/migration.js';
import type { Mode, ModeConfig } from '../model/mode.js';
import { WorkerGate } from '../bus/presence.js';
import { EndedMigrationError, ModeWatcher, UnknownMigrationError } from '../bus/registry.js';
import { migrationOfWorkSubject, workSubject, type WorkStage } from '../bus/subjects.js';
import { headersFor, observeQueueDepth, startSpan, traceparentFrom, traceparentOf } from '../telemetry/telemetry.js';
import { CpuAccount } from '../cpu/cpu-account.js';
import { announceRoom } from '../bus/room.js';
import { runActor, type ActorContext, type ActorDefinition, type ActorWiring, type RunningService } from './shell.js';

export type { RunningService } from './shell.js';

export interface StageOutput {
  chunk: Chunk;
  to: WorkStage;
}

export interface StageResult {
  outputs: StageOutput[];
  counts?: Record<string, number>;
}

export interface ChunkContext {
  descriptor: MigrationDescriptor;
  /** the mode the migration wants now (with the tuner's compression for other deltas) */
  mode: ModeConfig;
  log: Logger;
}

export interface StageActor {
  /** actor name in logs, stats and message ids */
  name: string;
  input: WorkStage;
  partition?: number;
  /** chunks handled at once by one process (more than 1 when the core runs on worker threads) */
  concurrency?: number;
  /**
   * The tuner may take some of this stage's workers out of use (see shared/bus/presence.ts). Such a
   * worker pulls one message at a time, so that one leaving use holds nothing another must wait for.
   */
  gated?: boolean;
  ackWaitMs?: number;
  /** called once per migration before its first chunk (load indexes, open files) */
  prepare?(descriptor: MigrationDescriptor, log: Logger): Promise<void>;
  handle(chunk: Chunk, ctx: ChunkContext): Promise<StageResult> | StageResult;
  /** the migration has ended: drop what `prepare` made for it */
  forget?(migrationId: string): void;
  close?(): Promise<void>;
}

/**
 * Where a chunk goes after `from`, given the mode: stages with nothing to do are skipped, saving a
 * hop (a mode without delta or compression, or a chunk that dedup turned into references only).
 */
export function nextStage(from: 'dedup' | 'delta' | 'compress', mode: Mode, chunk: Chunk): WorkStage {
  if (chunk.bodyRawLength === 0) return 'wire';
  if (from === 'dedup' && mode.delta !== 'none') return 'delta';
  // a patch is compressed already (in delta, against the base)
  if (from !== 'compress' && mode.compressor !== 'none' && chunk.mode.compressor === 'none') return 'compress';
  return 'wire';
}

/** descriptors older than this are prepared for at their first chunk only (see runStage) */
const PREPARE_AHEAD_MAX_AGE_MS = 10 * 60_000;

export interface RunningStage extends RunningService {
  bus: Bus;
}

/** A chunk stage in the actor shell. */
export function runStage(actor: StageActor, natsUrl: string): Promise<RunningStage> {
  return runActor(chunkStage(actor), natsUrl);
}

/** The stage binding: `actor`'s pure core behind its work queue's durable consumer. */
export function chunkStage(actor: StageActor): ActorDefinition {
  const prepared = new Map<string, Promise<void>>();
  const prepare = (descriptor: MigrationDescriptor, mlog: Logger): Promise<void> => {
    let p = prepared.get(descriptor.migrationId);
    if (!p) {
      p = actor.prepare ? actor.prepare(descriptor, mlog) : Promise.resolve();
      prepared.set(descriptor.migrationId, p);
      p.catch(() => prepared.delete(descriptor.migrationId));
    }
    return p;
  };
  return {
    name: actor.name,
    ...(actor.partition !== undefined ? { logFields: { partition: actor.partition } } : {}),
    forget(migrationId, ctx) {
      const p = prepared.get(migrationId);
      if (!p) return;
      prepared.delete(migrationId);
      void p.then(() => actor.forget?.(migrationId)).catch(() => undefined);
      ctx.log.debug('migration ended: state dropped', { migration: migrationId });
    },
    // Prepared when the descriptor appears, not at the first chunk, so the link does not wait on a
    // base index loading after capture has started. Not for an old descriptor a crashed control
    // path left: that one waits for a chunk.
    onDescriptor(descriptor, ctx) {
      if (!actor.prepare || Date.now() - descriptor.createdAtMs > PREPARE_AHEAD_MAX_AGE_MS) return;
      const mlog = ctx.logFor(descriptor.migrationId);
      prepare(descriptor, mlog).catch((err: unknown) => mlog.warn('cannot prepare ahead: will try again at the first chunk', { reason: errorMessage(err) }));
    },
    start: (ctx) => startStage(actor, ctx, prepare),
  };
}

async function startStage(actor: StageActor, ctx: ActorContext, prepare: (d: MigrationDescriptor, log: Logger) => Promise<void>): Promise<ActorWiring> {
  const { bus, log, instance, descriptors } = ctx;
  const modes = await ModeWatcher.start(bus.config);
  // a short ack wait, kept alive while a chunk is worked on: a killed instance's chunks go to another soon
  const ackWaitMs = actor.ackWaitMs ?? 10_000;
  const durable = await ensureWorkConsumer(bus, actor.input, actor.partition, ackWaitMs);
  const consumer = await bus.js.consumers.get(streamOf(actor.input), durable);
  const concurrency = actor.concurrency ?? 1;
  const gate = actor.gated ? await WorkerGate.start(bus, actor.name, instance, log) : undefined;
  const messages = gate ? undefined : await consumer.consume({ max_messages: Math.max(2, concurrency * 2) });
  log.info('ready', { consumer: durable, ...(gate ? { gated: true } : {}) });

  /** Gives up on a message: kept as a dead letter with the reason, its migration failed naming it. */
  const giveUp = async (m: JsMsg, migrationId: string, reason: string): Promise<void> => {
    await publishDeadLetter(bus, actor.name, migrationId, m, reason).catch((err: unknown) => log.warn('cannot keep the dead letter', { reason: errorMessage(err) }));
    m.term(reason);
    await ctx.fail(migrationId, reason);
  };

  const cpu = new CpuAccount();

  const processOne = async (m: JsMsg): Promise<void> => {
    let chunk: Chunk | undefined;
    const alive = setInterval(() => m.working(), ackWaitMs / 3);
    try {
      chunk = decodeChunk(m.data);
      const descriptor = await descriptors.get(chunk.migrationId);
      const mlog = ctx.logFor(chunk.migrationId);
      await prepare(descriptor, mlog);
      const cpuStart = cpu.start();
      const wallStart = performance.now();
      const mode = modes.get(chunk.migrationId, descriptor.mode);
      // only traced chunks carry a traceparent (capture chose them): this stage's span, child of the previous stage's
      const parent = traceparentFrom(m.headers);
      const span = parent ? startSpan(`${actor.name} chunk`, parent, { 'handoff.actor': actor.name, 'handoff.seq': chunk.seq, 'handoff.part': chunk.part, 'handoff.instance': instance }) : undefined;
      const result = await actor.handle(chunk, { descriptor, mode, log: mlog });
      span?.setAttributes({ 'handoff.mode': `${mode.delta}+${mode.compressor}:${mode.level}`, 'handoff.bytes_in': chunk.body.byteLength });
      span?.end();
      const outHeaders = headersFor(span ? traceparentOf(span) : undefined);
      const cpuMs = cpu.finish(cpuStart);
      const wallMs = performance.now() - wallStart;
      let bytesOut = 0;
      let modeOut = chunk.mode;
      let next: string | undefined;
      let blocks = 0;
      for (const out of result.outputs) {
        next = out.to;
        for (const len of out.chunk.bodyLength) if (len > 0) blocks++;
        const data = encodeChunk(out.chunk);
        bytesOut += out.chunk.body.byteLength;
        modeOut = out.chunk.mode;
        await publishWork(bus, workSubject(out.to, out.chunk.migrationId, out.to === 'dedup' ? out.chunk.part : 0), data, `${out.chunk.migrationId}.${actor.name}.${chunkKey(out.chunk)}`, outHeaders, () => m.working());
      }
      const stats: Omit<StageStats, 'stage' | 'instance'> = {
        migrationId: chunk.migrationId,
        round: chunk.round,
        seq: chunk.seq,
        part: chunk.part,
        pages: chunk.pageIndex.length,
        bytesIn: chunk.body.byteLength,
        bytesOut,
        cpuMs,
        wallMs,
        mode: modeOut,
        ...(next ? { next } : {}),
        // blocks: pages that carry a body (dedup's survivors), the unit of the tuner's costs
        counts: { ...result.counts, blocks },
      };
      ctx.publishStats(stats);
      m.ack();
      announceRoom(bus.nc, actor.input);
    } catch (err) {
      // the subject names the migration even when the message does not decode
      const migrationId = chunk?.migrationId ?? migrationOfWorkSubject(m.subject) ?? 'unknown';
      const reason = errorMessage(err);
      if (err instanceof EndedMigrationError) {
        log.debug('chunk of an ended migration dropped', { migration: migrationId });
        m.term(reason);
        return;
      }
      if (err instanceof MalformedMessageError || err instanceof UnknownMigrationError) {
        log.error('rejected message', { migration: migrationId, subject: m.subject, reason });
        await giveUp(m, migrationId, reason);
        return;
      }
      const attempt = m.info.deliveryCount;
      log.warn('chunk failed', { migration: migrationId, attempt, reason });
      if (attempt >= MAX_DELIVERIES) await giveUp(m, migrationId, `${actor.name} gave up on a chunk after ${attempt} attempts: ${reason}`);
      else m.nak(500 * attempt);
    } finally {
      clearInterval(alive);
    }
  };

  const inFlight = new Set<Promise<void>>();
  let stopped = false;
  /** a gated worker: `concurrency` lanes, each pulling the next message only while in use */
  const lane = async (g: WorkerGate): Promise<void> => {
    while (!stopped) {
      await g.whenInUse();
      if (stopped) return;
      const m = await consumer.next({ expires: 1000 }).catch(() => null);
      if (!m) continue;
      // taken out of use (or stopping) while waiting: another worker takes it now
      if (stopped || !g.inUse) m.nak();
      else await processOne(m);
    }
  };
  const done = (async () => {
    if (gate) {
      await Promise.all(Array.from({ length: concurrency }, () => lane(gate)));
      return;
    }
    for await (const m of messages!) {
      const p = processOne(m).finally(() => inFlight.delete(p));
      inFlight.add(p);
      if (inFlight.size >= concurrency) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
  })();

  const stop = async (): Promise<void> => {
    log.info('stopping: finishing in-flight chunks');
    stopped = true;
    messages?.stop();
    await gate?.stop();
    await done.catch(() => undefined);
    modes.stop();
    await actor.close?.();
  };
  // queue depth for the metrics: what waits for this stage, asked of JetStream when scraped
  observeQueueDepth(async () => {
    const info = await bus.jsm.consumers.info(streamOf(actor.input), durable);
    return { [actor.input]: info.num_pending + info.num_ack_pending };
  });
  return { done, stop };
}
