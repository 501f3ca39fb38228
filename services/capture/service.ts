/**
 * Capture actor: when a destination has accepted a migration, capture it (image files: one round
 * against the base, services/capture/round.ts; a running VM: pre-copy rounds, live.ts, or its
 * own migration stream, stream.ts) and announce each round's count.
 */
import { firstEvent } from '../../shared/bus/bus.js';
import { errorMessage } from '../../shared/model/errors.js';
import { consumeEvents } from '../../shared/actor/events.js';
import { runActor, type ActorContext, type ActorDefinition, type RunningService } from '../../shared/actor/shell.js';
import type { Logger } from '../../shared/telemetry/log.js';
import { HEAD_START_CHUNKS, parseEvent, type MigrationDescriptor } from '../../shared/model/migration.js';
import { captureLive } from './live.js';
import { captureRound, type CaptureGate } from './round.js';
import { captureStream } from './stream.js';

/**
 * The longest an adaptive migration's capture holds its chunks for the tuner's first look: the
 * sender's probe of the link (up to its 3 s timeout on a very slow link), then the ratio probe
 * where the link is the bottleneck.
 */
const FIRST_LOOK_WAIT_MS = 4000;

/**
 * The head start itself waits this long for the look: where the link is fast the look comes
 * within it and the head start goes in the chosen mode rather than the start mode. Where the link
 * is slow the link probe's padding holds the head start longer than this anyway.
 */
const HEAD_START_WAIT_MS = 50;

/** A capture takes long: JetStream is told this often that the `accepted` event is still being handled. */
const CAPTURE_HEARTBEAT_MS = 10_000;

/** Migrations one capture process captures at once: a long live capture holds no other back. */
const CONCURRENT_CAPTURES = 8;

/** The capture actor: takes `accepted` events (each by one instance) and captures that migration. */
export function captureActor(): ActorDefinition {
  return {
    name: 'capture',
    start: (ctx) =>
      consumeEvents(
        ctx,
        'accepted',
        async (m, d, mlog) => {
          parseEvent(m.data);
          await capture(ctx, d, mlog);
        },
        {
          maxMessages: CONCURRENT_CAPTURES,
          heartbeatMs: CAPTURE_HEARTBEAT_MS,
          onError: async (err, migrationId, mlog) => {
            mlog.error('capture failed', { reason: errorMessage(err) });
            await ctx.fail(migrationId, errorMessage(err));
          },
        },
      ),
  };
}

export function runCaptureService(natsUrl: string): Promise<RunningService> {
  return runActor(captureActor(), natsUrl);
}

async function capture(ctx: ActorContext, d: MigrationDescriptor, mlog: Logger): Promise<void> {
  const { bus } = ctx;
  let gate: CaptureGate | undefined;
  if (d.adaptive) {
    // The chunks after the head start go in the mode the tuner chose for this link and these
    // pages: the wire queue and the bytes in flight hold seconds of the link, encoded already, so
    // a mode chosen later would reach few of a small VM's chunks.
    const waitedFrom = performance.now();
    const open = firstEvent(bus, d.migrationId, 'tuned', FIRST_LOOK_WAIT_MS).then(
      (tuned) => {
        const waitedMs = Math.round(performance.now() - waitedFrom);
        if (tuned) mlog.info('the tuner has looked', { waitedMs, mode: tuned.decision.to });
        else mlog.warn('no look from the tuner: capture goes on in the start mode', { waitedMs });
      },
      (err: unknown) => mlog.warn('cannot wait for the tuner: capture goes on in the start mode', { reason: errorMessage(err) }),
    );
    gate = { afterChunks: HEAD_START_CHUNKS, open, headStartWaitMs: HEAD_START_WAIT_MS };
  }
  mlog.info('capture started');
  if (d.live?.machine) await captureStream(bus, d, mlog, gate, ctx.publishStats);
  else if (d.live) await captureLive(bus, d, mlog, gate, ctx.publishStats);
  else {
    const r = await captureRound(bus, d, 0, mlog, undefined, gate, ctx.publishStats);
    await ctx.publishEvent(d.migrationId, { type: 'captured', round: 0, slices: r.slices, imageHashes: r.imageHashes, dirtyPages: r.dirtyPages, scannedBytes: r.scannedBytes });
  }
}
