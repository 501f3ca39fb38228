/** Starting actors: in this process (`handoff actor NAME`) or as child processes of a command. */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { stopProcess } from '../shared/actor/child.js';
import { natsChildEnv } from '../shared/bus/nats-auth.js';
import { runStage } from '../shared/actor/stage.js';
import type { RunningService } from '../shared/actor/shell.js';
import { isReadyMessage, serveActorProcess } from '../shared/actor/process.js';

export const ACTOR_NAMES = ['capture', 'dedup', 'delta', 'compress', 'sender', 'tuner'] as const;
export type ActorName = (typeof ACTOR_NAMES)[number];

/** Runs one actor in this process, loading its modules only (an actor process needs no other's). */
export async function runNamedActor(name: ActorName, natsUrl: string, partition = 0): Promise<RunningService> {
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

/** `handoff actor NAME`: runs until SIGTERM/SIGINT, then finishes in-flight work and returns. */
export function actorMain(name: ActorName, natsUrl: string, partition: number): Promise<void> {
  return serveActorProcess(name, () => runNamedActor(name, natsUrl, partition));
}

const MAIN = fileURLToPath(new URL('./main.js', import.meta.url));

export interface ActorProcess {
  name: string;
  child: ChildProcess;
  /** resolves once the actor takes work; rejects, naming it, if it exits before */
  ready: Promise<void>;
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
    // ipc: the actor says when it takes work (see shared/actor/process.ts)
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    env: { ...nats.env, HANDOFF_LOG_LEVEL: options.logLevel ?? process.env.HANDOFF_LOG_LEVEL ?? 'warn' },
  });
  // the actor's lifeline to us (see shared/actor/process.ts): it holds our process no more than the child does
  child.channel?.unref();
  const label = options.partition !== undefined ? `${name}-${options.partition}` : name;
  const ready = new Promise<void>((resolve, reject) => {
    child.on('message', (m: unknown) => {
      if (isReadyMessage(m)) resolve();
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
