/**
 * The event binding of the actor shell: a durable consumer of one type of migration event, each
 * event handed to the actor with its migration's descriptor and acked when handled. A handler that
 * throws fails that migration (or does what `onError` says), never the actor.
 */
import { ensureEventConsumer, type JsMsg } from '../bus/bus.js';
import type { MigrationDescriptor, MigrationEvent } from '../model/migration.js';
import { STREAMS } from '../bus/subjects.js';
import { EndedMigrationError } from '../bus/registry.js';
import { errorMessage } from '../model/errors.js';
import type { Logger } from '../telemetry/log.js';
import type { ActorContext, ActorWiring } from './shell.js';

export interface EventHandler {
  (m: JsMsg, descriptor: MigrationDescriptor, log: Logger): Promise<void>;
}

export interface EventBindingOptions {
  /** events handled at once (of different migrations: one migration's events are handled in order) */
  maxMessages: number;
  /** a handler that runs long tells JetStream so this often, so the event is not delivered again meanwhile */
  heartbeatMs?: number;
  /** what a failed handler means (default: the migration fails, naming this actor) */
  onError?(err: unknown, migrationId: string, log: Logger): Promise<void>;
}

/** The migration an event's subject names (`handoff.events.<migrationId>.<type>`). */
export function eventMigrationId(subject: string): string {
  return subject.split('.')[2] ?? 'unknown';
}

export async function consumeEvents(ctx: ActorContext, type: MigrationEvent['type'], handle: EventHandler, options: EventBindingOptions): Promise<ActorWiring> {
  const durable = await ensureEventConsumer(ctx.bus.jsm, ctx.name, type);
  const messages = await (await ctx.bus.js.consumers.get(STREAMS.events, durable)).consume({ max_messages: options.maxMessages });
  ctx.log.info('ready', { consumer: durable });
  const onError =
    options.onError ??
    (async (err: unknown, migrationId: string, log: Logger): Promise<void> => {
      log.error(`${type} failed`, { reason: errorMessage(err) });
      await ctx.fail(migrationId, errorMessage(err));
    });
  // events of different migrations are handled at once (up to maxMessages), one migration's in order
  const inFlight = new Set<Promise<void>>();
  const lastOf = new Map<string, Promise<void>>();
  const handleOne = async (m: JsMsg, migrationId: string): Promise<void> => {
    const log = ctx.logFor(migrationId);
    try {
      await handle(m, await ctx.descriptors.get(migrationId), log);
    } catch (err) {
      if (err instanceof EndedMigrationError) log.debug(`${type} of an ended migration dropped`);
      else await onError(err, migrationId, log);
    } finally {
      m.ack();
    }
  };
  const done = (async () => {
    for await (const m of messages) {
      const migrationId = eventMigrationId(m.subject);
      const previous = lastOf.get(migrationId) ?? Promise.resolve();
      // from its arrival: an event waiting behind its migration's previous one is not delivered again
      const heartbeat = options.heartbeatMs ? setInterval(() => m.working(), options.heartbeatMs) : undefined;
      const p: Promise<void> = previous.then(() => handleOne(m, migrationId)).finally(() => {
        clearInterval(heartbeat);
        inFlight.delete(p);
        if (lastOf.get(migrationId) === p) lastOf.delete(migrationId);
      });
      lastOf.set(migrationId, p);
      inFlight.add(p);
      if (inFlight.size >= options.maxMessages) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
  })();
  return {
    done,
    stop: async () => {
      messages.stop();
      await done.catch(() => undefined);
    },
  };
}
