/**
 * Sender actor (WAN): opens the link when a migration starts (the destination accepts or refuses
 * before any page moves), streams the wire queue's chunks over it, and acks each JetStream message
 * only when the receiver has acknowledged it, so nothing unacknowledged is ever dropped.
 */
import { SpanStatusCode } from '@opentelemetry/api';
import { WIRE_QUEUE_MAX_BYTES, WIRE_QUEUE_MIN_BYTES, ensureWorkConsumer, resizeWireQueue, streamOf } from '../../shared/bus/bus.js';
import { RefusedError, errorMessage } from '../../shared/model/errors.js';
import { consumeEvents } from '../../shared/actor/events.js';
import { runActor, type ActorContext, type ActorDefinition, type ActorWiring, type RunningService } from '../../shared/actor/shell.js';
import type { Logger } from '../../shared/telemetry/log.js';
import { parseEvent, type MigrationDescriptor } from '../../shared/model/migration.js';
import { announceRoom } from '../../shared/bus/room.js';
import { CpuAccount } from '../../shared/cpu/cpu-account.js';
import { startSpan, traceparentFrom, traceparentOf } from '../../shared/telemetry/telemetry.js';
import { linkSecurityFromEnv, type LinkSecurity } from '../../shared/wire/link-security.js';
import { Saturation, ackedChunkStats, commitFailure, helloFor, inFlightLimitBytes, probeStats, wireQueueResizeBytes } from './core.js';
import { DestinationError, WanLink } from './link.js';

/** How long JetStream waits for a wire message's ack: a chunk is acked only once the receiver has it. */
const WIRE_ACK_WAIT_MS = 120_000;

export function senderActor(): ActorDefinition {
  return { name: 'sender', start: startSender };
}

export function runSenderService(natsUrl: string): Promise<RunningService> {
  return runActor(senderActor(), natsUrl);
}

/** One WAN link per migration, opened by its first event or chunk. */
class Links {
  private readonly links = new Map<string, Promise<WanLink>>();
  // `cpu` is shared with the chunks' statistics: no CPU is counted twice
  constructor(
    private readonly ctx: ActorContext,
    private readonly security: LinkSecurity,
    private readonly cpu: CpuAccount,
  ) {}

  open(d: MigrationDescriptor, mlog: Logger): Promise<WanLink> {
    let p = this.links.get(d.migrationId);
    if (p) return p;
    p = this.connect(d, mlog);
    this.links.set(d.migrationId, p);
    p.catch(() => this.links.delete(d.migrationId));
    return p;
  }

  /** the links' measured bandwidths added up (bits/s), those not yet measured as 0 */
  async totalBandwidthBps(): Promise<number> {
    let bps = 0;
    for (const p of this.links.values()) bps += (await p.catch(() => undefined))?.bandwidth.bandwidthBps ?? 0;
    return bps;
  }

  async closeAll(): Promise<void> {
    for (const p of this.links.values()) (await p.catch(() => undefined))?.close();
  }

  private async connect(d: MigrationDescriptor, mlog: Logger): Promise<WanLink> {
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
    mlog.info('destination accepted', { destination: d.destination });
    await ctx.publishEvent(d.migrationId, { type: 'accepted', destinationBaseHashes });
    // while capture starts: the link's speed, so an adaptive migration's first mode fits it
    if (d.adaptive) {
      const cpuStart = this.cpu.start();
      void link.probe().then((bandwidthBps) => {
        if (bandwidthBps === undefined) return;
        mlog.info('link probed', { bandwidthBps: Math.round(bandwidthBps) });
        ctx.publishStats(probeStats(d.migrationId, bandwidthBps, this.cpu.finish(cpuStart)));
      });
    }
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
            this.links.delete(d.migrationId);
            return;
          }
        }
        span.setAttributes({ 'handoff.verified': result.verified, 'handoff.wire_bytes': link.wireBytes, 'handoff.resent_bytes': link.resentBytes, 'handoff.reconnects': link.reconnects });
        span.end();
        mlog.info('destination result', { verified: result.verified });
        await ctx.publishEvent(d.migrationId, { type: 'result', result });
        link.close();
        this.links.delete(d.migrationId);
      },
      async (err: Error) => {
        span.setStatus({ code: SpanStatusCode.ERROR, message: err.message });
        span.end();
        mlog.error('WAN link failed', { reason: err.message });
        await ctx.fail(d.migrationId, err.message);
        this.links.delete(d.migrationId);
      },
    );
    return link;
  }
}

async function startSender(ctx: ActorContext): Promise<ActorWiring> {
  const { bus, log, descriptors } = ctx;
  // the link's credentials are this process's own (environment or files), never on the bus
  const security = linkSecurityFromEnv();
  // the sender's CPU per chunk: from the chunk's arrival or the previous statistics message, whichever came later
  const cpu = new CpuAccount();
  const links = new Links(ctx, security, cpu);

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

  // the wire queue follows the bandwidth (unless fixed by HANDOFF_WIRE_STREAM_MAX_BYTES)
  let wireQueueBytes = WIRE_QUEUE_MIN_BYTES;
  const sizer = setInterval(() => {
    if (process.env.HANDOFF_WIRE_STREAM_MAX_BYTES) return;
    void (async () => {
      const bps = await links.totalBandwidthBps();
      const target = wireQueueResizeBytes(bps, wireQueueBytes, { minBytes: WIRE_QUEUE_MIN_BYTES, maxBytes: WIRE_QUEUE_MAX_BYTES });
      if (target === undefined) return;
      wireQueueBytes = target;
      await resizeWireQueue(bus, target);
      log.debug('wire queue resized', { maxBytes: Math.round(target), bandwidthBps: Math.round(bps) });
    })().catch((err: unknown) => log.warn('cannot resize the wire queue', { reason: errorMessage(err) }));
  }, 1000);

  const durable = await ensureWorkConsumer(bus, 'wire', undefined, WIRE_ACK_WAIT_MS);
  const messages = await (await bus.js.consumers.get(streamOf('wire'), durable)).consume({ max_messages: 16 });
  log.info('ready', { consumer: durable });
  const inFlight = new Set<Promise<void>>();
  let inFlightBytes = 0;
  const saturation = new Saturation();
  const done = (async () => {
    saturation.idle();
    for await (const m of messages) {
      saturation.busy();
      // handoff.wire.<partition>.<migrationId>
      const migrationId = m.subject.split('.')[3]!;
      const mlog = ctx.logFor(migrationId);
      try {
        const link = await links.open(await descriptors.get(migrationId), mlog);
        const cpuStart = cpu.start();
        const started = performance.now();
        const size = m.data.byteLength;
        // only traced chunks carry a traceparent (capture chose them)
        const parent = traceparentFrom(m.headers);
        const chunkSpan = parent ? startSpan('send chunk', parent, { 'handoff.actor': 'sender', 'handoff.bytes': size }) : undefined;
        const sent = link.sendChunk(m.data);
        inFlightBytes += size;
        const p = sent
          .then(({ frameBytes, sends }) => {
            m.ack();
            announceRoom(bus.nc, 'wire');
            chunkSpan?.setAttributes({ 'handoff.frame_bytes': frameBytes, 'handoff.sends': sends });
            chunkSpan?.end();
            const chunk = { migrationId, streamSeq: m.seq, bytesIn: size, frameBytes, sends, cpuMs: cpu.finish(cpuStart), wallMs: performance.now() - started };
            const reading = { bandwidthBps: link.bandwidth.bandwidthBps, averageBandwidthBps: link.averageBandwidthBps, linkBoundShare: saturation.linkBoundShare, reconnects: link.takeReconnects() };
            ctx.publishStats(ackedChunkStats(chunk, reading));
          })
          .catch((err: Error) => {
            chunkSpan?.setStatus({ code: SpanStatusCode.ERROR, message: err.message });
            chunkSpan?.end();
            mlog.warn('chunk not acknowledged, will be redelivered', { reason: err.message });
            m.nak(1000);
          })
          .finally(() => {
            inFlightBytes -= size;
            inFlight.delete(p);
          });
        inFlight.add(p);
        saturation.linkBound();
        while (inFlightBytes > inFlightLimitBytes(link.bandwidth.bandwidthBps) && inFlight.size > 0) await Promise.race(inFlight);
        saturation.idle();
      } catch (err) {
        mlog.error('cannot send chunk', { reason: errorMessage(err) });
        m.nak(2000);
      }
      saturation.idle();
    }
    await Promise.all(inFlight);
  })();

  return {
    done,
    stop: async () => {
      clearInterval(sizer);
      messages.stop();
      await Promise.all([done.catch(() => undefined), starts.stop(), captures.stop()]);
      await links.closeAll();
    },
  };
}
