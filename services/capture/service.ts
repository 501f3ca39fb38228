/**
 * Capture actor: when a destination has accepted a migration, capture it (image files: one round
 * against the base, services/capture/round.ts; a running VM: pre-copy rounds, live.ts) and announce
 * each round's count.
 */
import { hostname } from 'node:os';
import { connectBus, ensureEventConsumer, firstEvent, publishEvent } from '../../shared/bus/bus.js';
import { errorMessage } from '../../shared/model/errors.js';
import type { RunningService } from '../../shared/actor/stage.js';
import { createLogger } from '../../shared/telemetry/log.js';
import { HEAD_START_CHUNKS, parseEvent } from '../../shared/model/migration.js';
import { DescriptorCache } from '../../shared/bus/registry.js';
import { STREAMS } from '../../shared/bus/subjects.js';
import { captureLive } from './live.js';
import { captureRound, type CaptureGate } from './round.js';

/**
 * The longest an adaptive migration's capture holds its chunks for the tuner's first look: the
 * sender's probe of the link (0.35 s at 5 Mbit/s, up to its 3 s timeout on a very slow link), then
 * the ratio probe where the link is the bottleneck.
 */
const FIRST_LOOK_WAIT_MS = 4000;

/**
 * The head start itself waits this long for the look: where the link is fast the look comes
 * within it (the link probe took 18-21 ms at 1000 Mbit/s, the decision 13-21 ms more), and the head
 * start goes in the chosen mode rather than patch-3 (three chunks of it, ~0.18 s of a one-core
 * source at 1000 Mbit/s, where adaptive then sent raw). Where the link is slow the link probe's
 * padding holds it longer than this anyway (192 KiB: 63 ms at 25 Mbit/s, less the shaper's burst).
 */
export const HEAD_START_WAIT_MS = 50;

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
        let gate: CaptureGate | undefined;
        if (d.adaptive) {
          // The chunks after the head start go in the mode the tuner chose for this link and these
          // pages: the wire queue and the bytes in flight hold about two seconds of the link, encoded
          // already, and at 25 Mbit/s a 64 MiB VM's changed pages are three seconds of it. A tuner
          // that began on xor+zstd-3 and chose delta=zstd 2 s in had sent every chunk in the start mode.
          const waitedFrom = performance.now();
          const open = firstEvent(bus, migrationId, 'tuned', FIRST_LOOK_WAIT_MS).then((tuned) => {
            const waitedMs = Math.round(performance.now() - waitedFrom);
            if (tuned) mlog.info('the tuner has looked', { waitedMs, mode: tuned.decision.to });
            else mlog.warn('no look from the tuner: capture goes on in the start mode', { waitedMs });
          }, (err: unknown) => mlog.warn('cannot wait for the tuner: capture goes on in the start mode', { reason: errorMessage(err) }));
          gate = { afterChunks: HEAD_START_CHUNKS, open, headStartWaitMs: HEAD_START_WAIT_MS };
        }
        mlog.info('capture started');
        if (d.live) await captureLive(bus, d, mlog, gate);
        else {
          const r = await captureRound(bus, d, 0, mlog, undefined, gate);
          await publishEvent(bus, migrationId, { type: 'captured', round: 0, slices: r.slices, imageHashes: r.imageHashes, dirtyPages: r.dirtyPages, scannedBytes: r.scannedBytes });
        }
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
