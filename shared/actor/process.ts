/**
 * An actor as a process of its own: started in the shell, health and metrics served where
 * HANDOFF_HEALTH_PORT asks for them, stopped gracefully on SIGTERM/SIGINT or when the command that
 * spawned it goes away.
 */
import { hostname } from 'node:os';
import { healthPortFromEnv, startHealthServer } from '../telemetry/health.js';
import { createLogger } from '../telemetry/log.js';
import { startTelemetry } from '../telemetry/telemetry.js';
import type { RunningService } from './shell.js';

/** the longest an actor told to stop takes to finish its in-flight work (a command gives its own 10 s, then SIGKILL) */
const STOP_DEADLINE_MS = 15_000;

/** What a spawned actor sends its command once it takes work. */
export interface ReadyMessage {
  type: 'ready';
}

export function isReadyMessage(m: unknown): m is ReadyMessage {
  return typeof m === 'object' && m !== null && (m as ReadyMessage).type === 'ready';
}

/** Runs `start`'s actor until SIGTERM/SIGINT, then finishes its in-flight work and returns. */
export async function serveActorProcess(name: string, start: () => Promise<RunningService>): Promise<void> {
  const actor = await start();
  const log = createLogger({ stage: name, instance: `${hostname()}:${process.pid}` });
  let stopping: Promise<void> | undefined;
  const shutdown = (): void => {
    if (stopping) return;
    stopping = actor.stop();
    // finishing in-flight work needs the bus: with its nats-server gone too, work waits on it for good
    setTimeout(() => {
      log.error('in-flight work not finished in time: exiting', { waitedMs: STOP_DEADLINE_MS });
      process.exit(1);
    }, STOP_DEADLINE_MS).unref();
  };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);
  // Spawned by a command: it is told we take work. The channel then stays as the command's
  // lifeline (unref'd: it keeps nothing alive), since a command killed outright sends no SIGTERM.
  if (process.send) {
    process.send({ type: 'ready' } satisfies ReadyMessage);
    process.channel?.unref();
    process.once('disconnect', () => {
      if (stopping) return;
      log.warn('the command that started this actor is gone: stopping');
      shutdown();
    });
  }
  const port = healthPortFromEnv();
  const health = port === undefined ? undefined : await startHealthServer(port, actor, await startTelemetry(name), log);
  await actor.done;
  await stopping;
  health?.close();
  const cpu = process.cpuUsage();
  log.info('exit', {
    cpuSeconds: Number(((cpu.user + cpu.system) / 1e6).toFixed(2)),
    maxRssMiB: Math.round(process.resourceUsage().maxRSS / 1024),
  });
}
