/** Starting actors: in this process (`handoff actor NAME`) or as child processes of a command. */
import { spawn, type ChildProcess } from 'node:child_process';
import { hostname } from 'node:os';
import { fileURLToPath } from 'node:url';
import { stopProcess } from '../shared/actor/child.js';
import { createLogger } from '../shared/telemetry/log.js';
import { natsChildEnv } from '../shared/bus/nats-auth.js';
import { runStage, type RunningService } from '../shared/actor/stage.js';
import { healthPortFromEnv, startHealthServer } from '../shared/telemetry/health.js';
import { startTelemetry } from '../shared/telemetry/telemetry.js';

export const ACTOR_NAMES = ['capture', 'dedup', 'delta', 'compress', 'sender', 'tuner'] as const;
export type ActorName = (typeof ACTOR_NAMES)[number];

/** Runs one actor in this process, loading its modules only (an actor process needs no other's). */
export async function runActor(name: ActorName, natsUrl: string, partition = 0): Promise<RunningService> {
  switch (name) {
    case 'capture':
      return (await import('../services/capture/service.js')).runCaptureService(natsUrl);
    case 'sender':
      return (await import('../services/sender/service.js')).runSenderService(natsUrl);
    case 'dedup':
      return runStage((await import('../services/dedup/service.js')).createDedupActor(partition), natsUrl);
    case 'delta':
      return runStage((await import('../services/delta/service.js')).createDeltaActor(), natsUrl);
    case 'compress':
      return runStage((await import('../services/compress/service.js')).createCompressActor(), natsUrl);
    case 'tuner':
      return (await import('../services/tuner/service.js')).runTunerService(natsUrl, process.env.HANDOFF_PROFILE);
  }
}

/** the longest an actor told to stop takes to finish its in-flight work (a command gives its own 10 s, then SIGKILL) */
const STOP_DEADLINE_MS = 15_000;

/** `handoff actor NAME`: runs until SIGTERM/SIGINT, then finishes in-flight work and returns. */
export async function actorMain(name: ActorName, natsUrl: string, partition: number): Promise<void> {
  const actor = await runActor(name, natsUrl, partition);
  const log = createLogger({ stage: name, instance: `${hostname()}:${process.pid}` });
  let stopping: Promise<void> | undefined;
  const shutdown = (): void => {
    if (stopping) return;
    stopping = actor.stop();
    // finishing in-flight work needs the bus: with its nats-server gone too (the command's process
    // group stopped at once) a delta and a sender waited on it for good
    setTimeout(() => {
      log.error('in-flight work not finished in time: exiting', { waitedMs: STOP_DEADLINE_MS });
      process.exit(1);
    }, STOP_DEADLINE_MS).unref();
  };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);
  // spawned by a command (spawnActor): it is told we take work. The channel then stays as the
  // command's lifeline (unref'd: it keeps nothing alive): a command killed outright (SIGKILL, a
  // crash) sends no SIGTERM, and its actors ran on under init, connected to a nats-server
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

const MAIN = fileURLToPath(new URL('./main.js', import.meta.url));

export interface ActorProcess {
  name: string;
  child: ChildProcess;
  /** resolves once the actor takes work; rejects, naming it, if it exits before */
  ready: Promise<void>;
}

interface ReadyMessage {
  type: 'ready';
}

/** Spawns `handoff actor NAME` as its own process; its logs go to our stderr. */
export function spawnActor(name: ActorName, natsUrl: string, options: { partition?: number; logLevel?: string; prefix?: string[] } = {}): ActorProcess {
  // HANDOFF_ACTOR_NODE_ARGS: node flags for actor processes (e.g. --cpu-prof), which NODE_OPTIONS refuses
  const nodeArgs = (process.env.HANDOFF_ACTOR_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const nats = natsChildEnv(natsUrl);
  const args = [...nodeArgs, MAIN, 'actor', name, '--nats', nats.url];
  if (options.partition !== undefined) args.push('--partition', String(options.partition));
  // prefix: a command it runs under, e.g. ['ip', 'netns', 'exec', NS] on another host
  const [command, ...prefixArgs] = options.prefix?.length ? [...options.prefix, process.execPath] : [process.execPath];
  const child = spawn(command!, [...prefixArgs, ...args], {
    // ipc: the actor says when it takes work (see actorMain)
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    env: { ...nats.env, HANDOFF_LOG_LEVEL: options.logLevel ?? process.env.HANDOFF_LOG_LEVEL ?? 'warn' },
  });
  // the actor's lifeline to us (see actorMain): it holds our process no more than the child does
  child.channel?.unref();
  const label = options.partition !== undefined ? `${name}-${options.partition}` : name;
  const ready = new Promise<void>((resolve, reject) => {
    child.on('message', (m: unknown) => {
      if (typeof m === 'object' && m !== null && (m as ReadyMessage).type === 'ready') resolve();
    });
    child.once('exit', (code, signal) => reject(new Error(`actor ${label} exited (${signal ?? `code ${code}`}) before it was ready`)));
    child.once('error', reject);
  });
  // callers that do not wait for it see its failure as the child's exit
  ready.catch(() => undefined);
  return { name: label, child, ready };
}

export async function stopActors(actors: ActorProcess[], graceMs = 10_000): Promise<void> {
  await Promise.all(actors.map(({ child }) => stopProcess(child, graceMs)));
}
