/**
 * Sender actor (WAN): opens the link when a migration starts (the destination accepts or refuses
 * before any page moves), streams the wire queue's chunks over it, and acks each JetStream message
 * only when the receiver has acknowledged it, so nothing unacknowledged is ever dropped.
 */
import { hostname } from 'node:os';
import { SpanStatusCode } from '@opentelemetry/api';
import { WIRE_QUEUE_MAX_BYTES, WIRE_QUEUE_MIN_BYTES, connectBus, ensureEventConsumer, ensureWorkConsumer, publishEvent, publishStats, resizeWireQueue, streamOf, type Bus, type JsMsg } from '../../shared/bus/bus.js';
import { RefusedError, errorMessage } from '../../shared/model/errors.js';
import type { RunningService } from '../../shared/actor/stage.js';
import { createLogger, type Logger } from '../../shared/telemetry/log.js';
import { parseEvent, type MigrationDescriptor, type StageStats } from '../../shared/model/migration.js';
import { DescriptorCache } from '../../shared/bus/registry.js';
import { announceRoom } from '../../shared/bus/room.js';
import { STREAMS } from '../../shared/bus/subjects.js';
import { startSpan, traceparentFrom, traceparentOf } from '../../shared/telemetry/telemetry.js';
import type { Hello } from '../../shared/wire/frames.js';
import { linkSecurityFromEnv } from '../../shared/wire/link-security.js';
import { DestinationError, WanLink } from './link.js';

/**
 * Unacknowledged bytes on the link: about a second of the measured bandwidth, enough to keep the
 * pipe full without running far ahead of it (a chunk in flight can no longer change mode).
 */
const MIN_IN_FLIGHT_BYTES = 1024 * 1024;
const MAX_IN_FLIGHT_BYTES = 8 * 1024 * 1024;
function inFlightLimit(bandwidthBps: number | undefined): number {
  if (!bandwidthBps) return MIN_IN_FLIGHT_BYTES * 2;
  return Math.min(MAX_IN_FLIGHT_BYTES, Math.max(MIN_IN_FLIGHT_BYTES, bandwidthBps / 8));
}

/** Share of recent time the sender waited on the link rather than on the pipeline (decays over ~2 s). */
class Saturation {
  private state: 'idle' | 'link' | 'busy' = 'busy';
  private since = performance.now();
  private linkMs = 0;
  private idleMs = 0;

  private switchTo(state: 'idle' | 'link' | 'busy'): void {
    const now = performance.now();
    const spent = now - this.since;
    const decay = Math.exp(-spent / 2000);
    this.linkMs = this.linkMs * decay + (this.state === 'link' ? spent : 0);
    this.idleMs = this.idleMs * decay + (this.state === 'idle' ? spent : 0);
    this.state = state;
    this.since = now;
  }

  idle(): void {
    this.switchTo('idle');
  }
  busy(): void {
    this.switchTo('busy');
  }
  linkBound(): void {
    this.switchTo('link');
  }

  get linkBoundShare(): number {
    this.switchTo(this.state);
    const total = this.linkMs + this.idleMs;
    return total > 0 ? this.linkMs / total : 1;
  }
}

export async function runSenderService(natsUrl: string): Promise<RunningService> {
  const instance = `${hostname()}:${process.pid}`;
  const log = createLogger({ stage: 'sender', instance });
  // the link's credentials are this process's own (environment or files), never on the bus
  const security = linkSecurityFromEnv();
  const bus = await connectBus(natsUrl, 'handoff-sender');
  // descriptors of ended migrations are dropped: a long-running actor does not grow
  const descriptors = await DescriptorCache.following(bus.migrations, () => undefined);
  const links = new Map<string, Promise<WanLink>>();

  const openLink = (d: MigrationDescriptor, mlog: Logger): Promise<WanLink> => {
    let p = links.get(d.migrationId);
    if (p) return p;
    p = (async () => {
      // the link's span: child of the migration's root; the destination's spans hang under it
      const span = startSpan('wan link', d.traceparent, { 'handoff.actor': 'sender', 'handoff.migration': d.migrationId, 'handoff.destination': d.destination });
      const linkTraceparent = d.traceparent ? traceparentOf(span) : undefined;
      const hello: Hello = {
        migrationId: d.migrationId,
        baseHashes: { memory: d.memory.baseHash, disk: d.disk.baseHash },
        bytes: { memory: d.memory.bytes, disk: d.disk.bytes },
        ...(linkTraceparent ? { traceparent: linkTraceparent, traceEveryChunks: d.traceEveryChunks ?? 1 } : {}),
        ...(d.live ? { vm: d.live.vm } : {}),
      };
      const { link, destinationBaseHashes } = await WanLink.open({
        address: d.destination,
        hello,
        security,
        rateCapBps: d.bandwidthCapBps,
        ...(d.linkDeadlineMs ? { deadlineMs: d.linkDeadlineMs } : {}),
        log: mlog,
      });
      mlog.info('destination accepted', { destination: d.destination });
      await publishEvent(bus, d.migrationId, { type: 'accepted', destinationBaseHashes });
      // while capture starts: the link's speed, so an adaptive migration's first mode fits it
      if (d.adaptive) {
        void link.probe().then((bandwidthBps) => {
          if (bandwidthBps === undefined) return;
          mlog.info('link probed', { bandwidthBps: Math.round(bandwidthBps) });
          publishStats(bus, {
            stage: 'sender',
            instance,
            migrationId: d.migrationId,
            round: 0,
            seq: 0,
            part: 0,
            pages: 0,
            bytesIn: 0,
            bytesOut: 0,
            cpuMs: 0,
            wallMs: 0,
            mode: { delta: 'none', compressor: 'none', level: 0 },
            counts: { bandwidthBps: Math.round(bandwidthBps), probe: 1 },
          });
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
              // the destination saying it could not resume is an answer (its VM does not run); a lost
              // link is not: the destination may be running the VM
              const answered = err instanceof DestinationError;
              mlog.error(answered ? 'destination could not resume the VM' : 'destination told to resume, then lost: its VM state is unknown', { reason: errorMessage(err) });
              await publishEvent(bus, d.migrationId, {
                type: 'failed',
                stage: 'sender',
                reason: answered ? errorMessage(err) : `link lost after the destination was told to resume the VM (${errorMessage(err)}): the source VM stays stopped`,
                ...(answered ? {} : { committed: true }),
              }).catch(() => undefined);
              links.delete(d.migrationId);
              return;
            }
          }
          span.setAttributes({ 'handoff.verified': result.verified, 'handoff.wire_bytes': link.wireBytes, 'handoff.resent_bytes': link.resentBytes, 'handoff.reconnects': link.reconnects });
          span.end();
          mlog.info('destination result', { verified: result.verified });
          await publishEvent(bus, d.migrationId, { type: 'result', result });
          link.close();
          links.delete(d.migrationId);
        },
        async (err: Error) => {
          span.setStatus({ code: SpanStatusCode.ERROR, message: err.message });
          span.end();
          mlog.error('WAN link failed', { reason: err.message });
          await publishEvent(bus, d.migrationId, { type: 'failed', stage: 'sender', reason: err.message }).catch(() => undefined);
          links.delete(d.migrationId);
        },
      );
      return link;
    })();
    links.set(d.migrationId, p);
    p.catch(() => links.delete(d.migrationId));
    return p;
  };

  const onEvents = async (type: 'start' | 'captured', handle: (m: JsMsg, d: MigrationDescriptor, mlog: Logger) => Promise<void>): Promise<{ stop(): void; done: Promise<void> }> => {
    const durable = await ensureEventConsumer(bus.jsm, 'sender', type);
    const messages = await (await bus.js.consumers.get(STREAMS.events, durable)).consume({ max_messages: 4 });
    const done = (async () => {
      for await (const m of messages) {
        const migrationId = m.subject.split('.')[2]!;
        const mlog = log.child({ migration: migrationId });
        try {
          const d = await descriptors.get(migrationId);
          await handle(m, d, mlog);
        } catch (err) {
          const reason = errorMessage(err);
          mlog.error(`${type} failed`, { reason });
          if (err instanceof RefusedError) await publishEvent(bus, migrationId, { type: 'refused', reason });
          else await publishEvent(bus, migrationId, { type: 'failed', stage: 'sender', reason }).catch(() => undefined);
        } finally {
          m.ack();
        }
      }
    })();
    return { stop: () => messages.stop(), done };
  };

  const starts = await onEvents('start', async (_m, d, mlog) => {
    await openLink(d, mlog);
  });
  const captures = await onEvents('captured', async (m, d, mlog) => {
    const event = parseEvent(m.data);
    if (event.type !== 'captured') return;
    const link = await openLink(d, mlog);
    await link.sendCaptured({
      round: event.round,
      slices: event.slices,
      imageHashes: event.imageHashes,
      ...(event.final !== undefined ? { final: event.final } : {}),
      ...(event.deviceState ? { deviceState: event.deviceState } : {}),
    });
  });

  // the wire queue follows the bandwidth: ~1 s of it (unless fixed by HANDOFF_WIRE_STREAM_MAX_BYTES)
  let wireQueueBytes = WIRE_QUEUE_MIN_BYTES;
  const sizer = setInterval(() => {
    if (process.env.HANDOFF_WIRE_STREAM_MAX_BYTES) return;
    void (async () => {
      let bps = 0;
      for (const p of links.values()) bps += (await p.catch(() => undefined))?.bandwidth.bandwidthBps ?? 0;
      if (bps <= 0) return;
      const target = Math.min(WIRE_QUEUE_MAX_BYTES, Math.max(WIRE_QUEUE_MIN_BYTES, bps / 8));
      if (target > wireQueueBytes * 1.5 || target < wireQueueBytes / 1.5) {
        wireQueueBytes = target;
        await resizeWireQueue(bus, target);
        log.debug('wire queue resized', { maxBytes: Math.round(target), bandwidthBps: Math.round(bps) });
      }
    })().catch((err: unknown) => log.warn('cannot resize the wire queue', { reason: errorMessage(err) }));
  }, 1000);

  const durable = await ensureWorkConsumer(bus, 'wire', undefined, 120_000);
  const messages = await (await bus.js.consumers.get(streamOf('wire'), durable)).consume({ max_messages: 16 });
  log.info('ready', { consumer: durable });
  const inFlight = new Set<Promise<void>>();
  let inFlightBytes = 0;
  // Is the link the bottleneck? Time spent waiting for ACKs with the window full (link-bound)
  // against time spent waiting for chunks (pipeline-bound): ACKs measure the link's capacity only
  // in the first case, else only a lower bound of it.
  const saturation = new Saturation();
  const done = (async () => {
    saturation.idle();
    for await (const m of messages) {
      saturation.busy();
      const migrationId = m.subject.split('.')[3]!;
      const mlog = log.child({ migration: migrationId });
      try {
        const link = await openLink(await descriptors.get(migrationId), mlog);
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
            const stats: StageStats = {
              stage: 'sender',
              instance,
              migrationId,
              round: 0,
              seq: m.seq,
              part: 0,
              pages: 0,
              bytesIn: size,
              bytesOut: frameBytes,
              cpuMs: 0,
              wallMs: performance.now() - started,
              mode: { delta: 'none', compressor: 'none', level: 0 },
              counts: {
                bandwidthBps: Math.round(link.bandwidth.bandwidthBps ?? 0),
                averageBandwidthBps: Math.round(link.averageBandwidthBps),
                linkBoundPct: Math.round(saturation.linkBoundShare * 100),
                // bytes this chunk cost beyond one copy (resent after a drop or a corrupted frame)
                resentBytes: (sends - 1) * frameBytes,
                reconnects: link.takeReconnects(),
              },
            };
            publishStats(bus, stats);
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
        while (inFlightBytes > inFlightLimit(link.bandwidth.bandwidthBps) && inFlight.size > 0) await Promise.race(inFlight);
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
    ready: () => bus.connected(),
    done,
    stop: async () => {
      clearInterval(sizer);
      starts.stop();
      captures.stop();
      messages.stop();
      await Promise.all([done, starts.done, captures.done]).catch(() => undefined);
      for (const p of links.values()) (await p.catch(() => undefined))?.close();
      descriptors.stop();
      await bus.close();
    },
  };
}
