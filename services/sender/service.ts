/**
 * Sender actor (WAN): opens the link when a migration starts (the destination accepts or refuses
 * before any page moves), streams the migration's chunks from the wire queue over it, and acks each
 * JetStream message only when the receiver has acknowledged it, so nothing unacknowledged is ever
 * dropped. Each migration has its own lane: its own consumer of the wire queue and its own window
 * of bytes in flight, so a slow link holds no other migration's chunks back.
 */
import { SpanStatusCode } from '@opentelemetry/api';
import { WIRE_QUEUE_MAX_BYTES, WIRE_QUEUE_MIN_BYTES, dropMigrationWork, publishLinkReport, purgeEndedWireWork, ensureMigrationWireConsumer, resizeWireQueue, streamOf, type JsMsg } from '../../shared/bus/bus.js';
import { migrationBacklogMaxMessages } from '../../shared/config/limits.js';
import { PAGE_SIZE } from '../../shared/image/pages.js';
import { durableName } from '../../shared/bus/subjects.js';
import { RefusedError, errorMessage } from '../../shared/model/errors.js';
import { consumeEvents } from '../../shared/actor/events.js';
import { runActor, type ActorContext, type ActorDefinition, type ActorWiring, type RunningService } from '../../shared/actor/shell.js';
import type { Logger } from '../../shared/telemetry/log.js';
import { parseEvent, type MigrationDescriptor } from '../../shared/model/migration.js';
import { announceRoom } from '../../shared/bus/room.js';
import { CpuAccount } from '../../shared/cpu/cpu-account.js';
import { startSpan, traceparentFrom, traceparentOf } from '../../shared/telemetry/telemetry.js';
import { linkSecurityFromEnv, type LinkSecurity } from '../../shared/wire/link-security.js';
import { Saturation, ackedChunkStats, commitFailure, helloFor, inFlightLimitBytes, wireQueueResizeBytes } from './core.js';
import { DestinationError, WanLink } from './link.js';

/** How long JetStream waits for a wire message's ack: a chunk is acked only once the receiver has it. */
const WIRE_ACK_WAIT_MS = 120_000;
/** How often the wire queue is swept of ended migrations' chunks. */
const WIRE_SWEEP_MS = 2000;

export function senderActor(): ActorDefinition {
  let links: Links | undefined;
  return {
    name: 'sender',
    start: async (ctx) => {
      const wiring = await startSender(ctx);
      links = wiring.links;
      return wiring;
    },
    // the migration has ended: its lane stopped, its consumer and leftover messages dropped
    forget: (migrationId, ctx) => void links?.drop(migrationId).then(() => dropMigrationWork(ctx.bus, migrationId)).catch((err: unknown) => ctx.log.warn('cannot drop the migration\'s wire work', { migration: migrationId, reason: errorMessage(err) })),
  };
}

export function runSenderService(natsUrl: string): Promise<RunningService> {
  return runActor(senderActor(), natsUrl);
}

/**
 * One migration's lane: its consumer of the wire queue, read at its link's pace, each chunk acked
 * once the destination has it; the bytes in flight bounded by this link's bandwidth alone.
 */
class WireLane {
  private stopped = false;
  private constructor(
    private readonly done: Promise<void>,
    private readonly stopReading: () => void,
  ) {}

  static async start(ctx: ActorContext, d: MigrationDescriptor, link: WanLink, cpu: CpuAccount, mlog: Logger): Promise<WireLane> {
    const { bus } = ctx;
    const durable = await ensureMigrationWireConsumer(bus, d.migrationId, WIRE_ACK_WAIT_MS);
    const messages = await (await bus.js.consumers.get(streamOf('wire'), durable)).consume({ max_messages: 16 });
    mlog.debug('wire lane open', { consumer: durable });
    const inFlight = new Set<Promise<void>>();
    let inFlightBytes = 0;
    let lastFailure: string | undefined;
    const saturation = new Saturation();
    const send = (m: JsMsg): void => {
      const cpuStart = cpu.start();
      const started = performance.now();
      const size = m.data.byteLength;
      // only traced chunks carry a traceparent (capture chose them)
      const parent = traceparentFrom(m.headers);
      const chunkSpan = parent ? startSpan('send chunk', parent, { 'handoff.actor': 'sender', 'handoff.bytes': size }) : undefined;
      inFlightBytes += size;
      const p = link
        .sendChunk(m.data)
        .then(({ frameBytes, sends }) => {
          m.ack();
          lastFailure = undefined;
          announceRoom(bus.nc, 'wire');
          chunkSpan?.setAttributes({ 'handoff.frame_bytes': frameBytes, 'handoff.sends': sends });
          chunkSpan?.end();
          const chunk = { migrationId: d.migrationId, streamSeq: m.seq, bytesIn: size, frameBytes, sends, cpuMs: cpu.finish(cpuStart), wallMs: performance.now() - started };
          ctx.publishStats(ackedChunkStats(chunk, link.takeReconnects()));
          const bandwidthBps = link.bandwidth.bandwidthBps;
          publishLinkReport(bus, {
            type: 'measured',
            migrationId: d.migrationId,
            ...(bandwidthBps !== undefined ? { bandwidthBps: Math.round(bandwidthBps) } : {}),
            averageBandwidthBps: Math.round(link.averageBandwidthBps),
            linkBoundShare: saturation.linkBoundShare,
          });
        })
        .catch((err: Error) => {
          chunkSpan?.setStatus({ code: SpanStatusCode.ERROR, message: err.message });
          chunkSpan?.end();
          // the chunks in flight fail together when the link does: said once per failure
          if (err.message !== lastFailure) mlog.warn('chunks not acknowledged, will be redelivered', { reason: err.message });
          lastFailure = err.message;
          m.nak(1000);
        })
        .finally(() => {
          inFlightBytes -= size;
          inFlight.delete(p);
        });
      inFlight.add(p);
    };
    const done = (async () => {
      saturation.idle();
      for await (const m of messages) {
        saturation.busy();
        try {
          send(m);
          saturation.linkBound();
          while (inFlightBytes > inFlightLimitBytes(link.bandwidth.bandwidthBps) && inFlight.size > 0) await Promise.race(inFlight);
        } catch (err) {
          mlog.error('cannot send chunk', { reason: errorMessage(err) });
          m.nak(2000);
        }
        saturation.idle();
      }
      await Promise.all(inFlight);
    })();
    return new WireLane(done, () => messages.stop());
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.stopReading();
    await this.done.catch(() => undefined);
  }
}

/** One WAN link per migration, opened by its first event, with its lane of the wire queue. */
class Links {
  private readonly links = new Map<string, Promise<{ link: WanLink; lane: WireLane; descriptor: MigrationDescriptor }>>();
  // `cpu` is shared with the chunks' statistics: no CPU is counted twice
  constructor(
    private readonly ctx: ActorContext,
    private readonly security: LinkSecurity,
    private readonly cpu: CpuAccount,
  ) {}

  async open(d: MigrationDescriptor, mlog: Logger): Promise<WanLink> {
    let p = this.links.get(d.migrationId);
    if (!p) {
      p = this.connect(d, mlog);
      this.links.set(d.migrationId, p);
      p.catch(() => this.links.delete(d.migrationId));
    }
    return (await p).link;
  }

  /** the links' measured bandwidths added up (bits/s), those not yet measured as 0 */
  async totalBandwidthBps(): Promise<number> {
    let bps = 0;
    for (const p of this.links.values()) bps += (await p.catch(() => undefined))?.link.bandwidth.bandwidthBps ?? 0;
    return bps;
  }

  /** what the wire queue must hold for every lane's migration to have its whole backlog there */
  async backlogBytes(): Promise<number> {
    let bytes = 0;
    for (const p of this.links.values()) {
      const open = await p.catch(() => undefined);
      if (open) bytes += migrationBacklogMaxMessages() * open.descriptor.chunkPages * PAGE_SIZE;
    }
    return bytes;
  }

  /** The migration's lane stopped and its link closed (it has ended). */
  async drop(migrationId: string): Promise<void> {
    const p = this.links.get(migrationId);
    this.links.delete(migrationId);
    const open = await p?.catch(() => undefined);
    await open?.lane.stop();
    open?.link.close();
  }

  async closeAll(): Promise<void> {
    for (const migrationId of [...this.links.keys()]) await this.drop(migrationId);
  }

  private async connect(d: MigrationDescriptor, mlog: Logger): Promise<{ link: WanLink; lane: WireLane; descriptor: MigrationDescriptor }> {
    const { ctx } = this;
    // the link's span: child of the migration's root; the destination's spans hang under it
    const span = startSpan('wan link', d.traceparent, { 'handoff.actor': 'sender', 'handoff.migration': d.migrationId, 'handoff.destination': d.destination });
    const { link, destinationBaseHashes } = await WanLink.open({
      address: d.destination,
      hello: helloFor(d, d.traceparent ? traceparentOf(span) : undefined),
      security: this.security,
      rateCapBps: d.bandwidthCapBps,
      ...(d.linkDeadlineMs ? { deadlineMs: d.linkDeadlineMs } : {}),
      log: mlog,
    });
    const lane = await WireLane.start(ctx, d, link, this.cpu, mlog).catch((err: unknown) => {
      link.close();
      throw err;
    });
    mlog.info('destination accepted', { destination: d.destination });
    await ctx.publishEvent(d.migrationId, { type: 'accepted', destinationBaseHashes });
    // while capture starts: the link's speed, so an adaptive migration's first mode fits it
    if (d.adaptive) {
      void link.probe().then((bandwidthBps) => {
        if (bandwidthBps === undefined) return;
        mlog.info('link probed', { bandwidthBps: Math.round(bandwidthBps) });
        publishLinkReport(ctx.bus, { type: 'probed', migrationId: d.migrationId, bandwidthBps: Math.round(bandwidthBps) });
      // a link lost mid-probe fails the migration through link.result; the probe only goes unread
      }, (err: unknown) => mlog.warn('link probe not finished', { reason: errorMessage(err) }));
    }
    const ended = (): Promise<void> => this.drop(d.migrationId);
    link.result.then(
      async (result) => {
        if (result.vmReady) {
          // the source VM is stopped and stays so: the destination's runs from now
          try {
            result.resumedAtMs = await link.commit();
          } catch (err) {
            span.end();
            const failure = commitFailure(err instanceof DestinationError, errorMessage(err));
            mlog.error(failure.log, { reason: errorMessage(err) });
            await ctx.fail(d.migrationId, failure.reason, failure.committed ? { committed: true } : undefined);
            await ended();
            return;
          }
        }
        span.setAttributes({ 'handoff.verified': result.verified, 'handoff.wire_bytes': link.wireBytes, 'handoff.resent_bytes': link.resentBytes, 'handoff.reconnects': link.reconnects });
        span.end();
        mlog.info('destination result', { verified: result.verified });
        await ctx.publishEvent(d.migrationId, { type: 'result', result });
        await ended();
      },
      async (err: Error) => {
        span.setStatus({ code: SpanStatusCode.ERROR, message: err.message });
        span.end();
        mlog.error('WAN link failed', { reason: err.message });
        await ctx.fail(d.migrationId, err.message);
        await ended();
      },
    );
    return { link, lane, descriptor: d };
  }
}

async function startSender(ctx: ActorContext): Promise<ActorWiring & { links: Links }> {
  const { bus, log } = ctx;
  // the link's credentials are this process's own (environment or files), never on the bus
  const security = linkSecurityFromEnv();
  // the sender's CPU per chunk: from the chunk's arrival or the previous statistics message, whichever came later
  const cpu = new CpuAccount();
  const links = new Links(ctx, security, cpu);
  // one consumer per migration now: the shared one of earlier versions would overlap them
  await bus.jsm.consumers.delete(streamOf('wire'), durableName('wire')).catch(() => undefined);

  // the destination refusing is the migration's answer, not the sender failing
  const onError = async (type: 'start' | 'captured', err: unknown, migrationId: string, mlog: Logger): Promise<void> => {
    const reason = errorMessage(err);
    mlog.error(`${type} failed`, { reason });
    if (err instanceof RefusedError) await ctx.publishEvent(migrationId, { type: 'refused', reason });
    else await ctx.fail(migrationId, reason);
  };
  const starts = await consumeEvents(
    ctx,
    'start',
    async (_m, d, mlog) => {
      await links.open(d, mlog);
    },
    { maxMessages: 4, onError: (err, migrationId, mlog) => onError('start', err, migrationId, mlog) },
  );
  const captures = await consumeEvents(
    ctx,
    'captured',
    async (m, d, mlog) => {
      const event = parseEvent(m.data);
      if (event.type !== 'captured') return;
      const link = await links.open(d, mlog);
      await link.sendCaptured({
        round: event.round,
        slices: event.slices,
        imageHashes: event.imageHashes,
        ...(event.final !== undefined ? { final: event.final } : {}),
        ...(event.deviceState ? { deviceState: event.deviceState } : {}),
      });
    },
    { maxMessages: 4, onError: (err, migrationId, mlog) => onError('captured', err, migrationId, mlog) },
  );

  // the wire queue follows the bandwidth, and holds every migration's backlog (unless fixed by HANDOFF_WIRE_STREAM_MAX_BYTES)
  let wireQueueBytes = WIRE_QUEUE_MIN_BYTES;
  const sizer = setInterval(() => {
    if (process.env.HANDOFF_WIRE_STREAM_MAX_BYTES) return;
    void (async () => {
      const bps = await links.totalBandwidthBps();
      const backlogBytes = await links.backlogBytes();
      const sized = wireQueueResizeBytes(bps, wireQueueBytes, { minBytes: Math.max(WIRE_QUEUE_MIN_BYTES, backlogBytes), maxBytes: Math.max(WIRE_QUEUE_MAX_BYTES, backlogBytes) });
      const target = sized ?? (wireQueueBytes < backlogBytes ? backlogBytes : undefined);
      if (target === undefined) return;
      wireQueueBytes = target;
      await resizeWireQueue(bus, target);
      log.debug('wire queue resized', { maxBytes: Math.round(target), bandwidthBps: Math.round(bps), backlogBytes });
    })().catch((err: unknown) => log.warn('cannot resize the wire queue', { reason: errorMessage(err) }));
  }, 1000);
  const sweeper = setInterval(() => {
    void purgeEndedWireWork(bus)
      .then((purged) => { if (purged.length) log.info('ended migrations\' chunks purged from the wire queue', { migrations: purged.join(',') }); })
      .catch((err: unknown) => log.debug('cannot sweep the wire queue', { reason: errorMessage(err) }));
  }, WIRE_SWEEP_MS);
  log.info('ready', { consumer: 'wire-<migration>' });

  return {
    links,
    // the event bindings end when the bus goes; the lanes with their links
    done: Promise.all([starts.done, captures.done]).then(() => undefined),
    stop: async () => {
      clearInterval(sizer);
      clearInterval(sweeper);
      await Promise.all([starts.stop(), captures.stop()]);
      await links.closeAll();
    },
  };
}
