/**
 * The one actor shell every actor runs in: it connects to the bus, follows the migrations'
 * descriptors (dropping an actor's per-migration state when one ends), hands the actor a context
 * for logs, statistics and failures, says when it is ready, and stops it gracefully. An actor is
 * its pure core plus the wiring it starts here (see stage.ts for chunk stages, events.ts for
 * event consumers).
 */
import { hostname } from 'node:os';
import { connectBus, publishEvent, publishStats, type Bus } from '../bus/bus.js';
import { DescriptorCache } from '../bus/registry.js';
import type { MigrationDescriptor, MigrationEvent, StageStats } from '../model/migration.js';
import { createLogger, type Logger } from '../telemetry/log.js';

/** What every actor process runs: started by `runActor`, stopped on SIGTERM (see process.ts). */
export interface RunningService {
  /** resolves when it has stopped taking work and finished what it had */
  done: Promise<void>;
  /** stop taking work, finish in-flight work, disconnect */
  stop(): Promise<void>;
  /** connected to NATS and taking work (readiness) */
  ready(): boolean;
}

/** What the shell gives an actor's wiring. */
export interface ActorContext {
  readonly name: string;
  /** host:pid, in logs, statistics and presence keys */
  readonly instance: string;
  readonly log: Logger;
  readonly bus: Bus;
  readonly descriptors: DescriptorCache;
  /** this actor's logger for one migration */
  logFor(migrationId: string): Logger;
  /** one statistics message, stamped with this actor's name and instance */
  publishStats(stats: Omit<StageStats, 'stage' | 'instance'>): void;
  /** fails `migrationId`, naming this actor as the stage (never throws: a failure to say so is logged) */
  fail(migrationId: string, reason: string, extra?: { committed?: true }): Promise<void>;
  /** any other event of the migration */
  publishEvent(migrationId: string, event: MigrationEvent): Promise<void>;
}

/** What an actor's wiring returns: its loops, and how to end them. */
export interface ActorWiring {
  /** settles when the wiring's loops have ended */
  done: Promise<void>;
  /** stop taking work and finish what is in flight; the shell then closes the bus */
  stop(): Promise<void>;
  /** taking work, beyond the bus being connected (default: always) */
  ready?(): boolean;
}

export interface ActorDefinition<W extends ActorWiring = ActorWiring> {
  /** the actor's name in logs, statistics and the bus connection's name */
  name: string;
  /** log fields beside the stage and instance (a dedup partition) */
  logFields?: Record<string, string | number>;
  /** a migration's descriptor appeared (an actor may prepare for it before its first message) */
  onDescriptor?(descriptor: MigrationDescriptor, ctx: ActorContext): void;
  /** a migration has ended (its descriptor deleted): drop what the actor holds for it */
  forget?(migrationId: string, ctx: ActorContext): void;
  /** starts the actor's wiring on the connected bus */
  start(ctx: ActorContext): Promise<W>;
}

export interface RunningActor<W extends ActorWiring = ActorWiring> extends RunningService {
  bus: Bus;
  wiring: W;
}

export async function runActor<W extends ActorWiring>(actor: ActorDefinition<W>, natsUrl: string): Promise<RunningActor<W>> {
  const instance = `${hostname()}:${process.pid}`;
  const log = createLogger({ stage: actor.name, instance, ...actor.logFields });
  const bus = await connectBus(natsUrl, `handoff-${actor.name}`);
  // the context is complete before the watch delivers its first descriptor
  const descriptors = new DescriptorCache(bus.migrations);
  const ctx: ActorContext = {
    name: actor.name,
    instance,
    log,
    bus,
    descriptors,
    logFor: (migrationId) => log.child({ migration: migrationId }),
    publishStats: (stats) => publishStats(bus, { stage: actor.name, instance, ...stats }),
    fail: (migrationId, reason, extra) =>
      publishEvent(bus, migrationId, { type: 'failed', stage: actor.name, reason, ...extra }).catch((err: unknown) =>
        log.warn('cannot publish the failure', { migration: migrationId, reason: String(err) }),
      ),
    publishEvent: (migrationId, event) => publishEvent(bus, migrationId, event),
  };
  try {
    await descriptors.follow(
      (migrationId) => actor.forget?.(migrationId, ctx),
      actor.onDescriptor ? (descriptor) => actor.onDescriptor!(descriptor, ctx) : undefined,
    );
  } catch (err) {
    await bus.close();
    throw err;
  }
  let wiring: W;
  try {
    wiring = await actor.start(ctx);
  } catch (err) {
    descriptors.stop();
    await bus.close();
    throw err;
  }
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      await wiring.stop();
      await wiring.done.catch(() => undefined);
      descriptors.stop();
      await bus.close();
    })();
    return stopping;
  };
  return {
    bus,
    wiring,
    done: wiring.done,
    stop,
    ready: () => !stopping && bus.connected() && (wiring.ready?.() ?? true),
  };
}
