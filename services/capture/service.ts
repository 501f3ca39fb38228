/**
 * Capture actor: when a destination has accepted a migration, capture it (image files: one round
 * against the base, services/capture/round.ts; a running VM: pre-copy rounds, live.ts) and announce
 * each round's count.
 */
import { hostname } from 'node:os';
import { connectBus, ensureEventConsumer, publishEvent } from '../../shared/bus.js';
import { errorMessage } from '../../shared/errors.js';
import type { RunningService } from '../../shared/stage.js';
import { createLogger } from '../../shared/log.js';
import { parseEvent } from '../../shared/migration.js';
import { DescriptorCache } from '../../shared/registry.js';
import { STREAMS } from '../../shared/subjects.js';
import { captureLive } from './live.js';
import { captureRound } from './round.js';

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
        if (d.live) await captureLive(bus, d, mlog);
        else {
          const r = await captureRound(bus, d, 0, mlog);
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
