/**
 * Which workers of a stage run, and how many of them the tuner wants in use. A worker keeps a key
 * alive in the workers bucket (entries expire PRESENCE_TTL_MS after their last write, so a killed
 * worker drops out by itself); the tuner counts the live keys and writes `want.STAGE`. A worker
 * whose rank (its key's place among the live ones, sorted) is at or past the wanted count takes no
 * work. Without a wish (no adaptive migration, or a tuner silent for PRESENCE_TTL_MS) all work.
 */
import { Kvm, type KV } from '@nats-io/kv';
import type { Bus } from './bus.js';
import type { Logger } from './log.js';
import { BUCKETS } from './subjects.js';

export const PRESENCE_TTL_MS = 5000;
const TICK_MS = 500;

export async function workersBucket(bus: Bus): Promise<KV> {
  return new Kvm(bus.js).create(BUCKETS.workers, { history: 1, ttl: PRESENCE_TTL_MS });
}

/** A worker's key: the stage, then its instance name with what KV keys do not allow replaced. */
export function presenceKey(stage: string, instance: string): string {
  return `${stage}.${instance.replace(/[^-\w]/g, '_')}`;
}

/** Keys of the stage's running workers, sorted: a worker's rank is its place here. */
export async function liveWorkers(kv: KV, stage: string): Promise<string[]> {
  // a heartbeat written while the keys are listed can show up twice
  const keys = new Set<string>();
  for await (const k of await kv.keys(`${stage}.*`)) keys.add(k);
  return [...keys].sort();
}

export async function wantedWorkers(kv: KV, stage: string): Promise<number | undefined> {
  const e = await kv.get(`want.${stage}`);
  if (!e || e.operation !== 'PUT') return undefined;
  const n = Number(e.string());
  return Number.isInteger(n) && n >= 1 ? n : undefined;
}

/** The tuner's wish (written again while it holds: it expires with the entry's age). */
export async function setWantedWorkers(kv: KV, stage: string, workers: number | undefined): Promise<void> {
  if (workers === undefined) await kv.delete(`want.${stage}`);
  else await kv.put(`want.${stage}`, String(workers));
}

/** Pure: is the worker of rank `rank` (-1: not listed yet) in use when `wanted` are wanted? */
export function inUse(rank: number, wanted: number | undefined): boolean {
  return wanted === undefined || rank < 0 || rank < wanted;
}

/** A worker's side: its heartbeat, and whether it should take work now. */
export class WorkerGate {
  private active = true;
  private waiters: (() => void)[] = [];
  private stopped = false;
  private readonly timer: NodeJS.Timeout;

  private constructor(
    private readonly kv: KV,
    private readonly stage: string,
    private readonly key: string,
    private readonly log: Logger,
  ) {
    this.timer = setInterval(() => void this.tick(), TICK_MS);
  }

  static async start(bus: Bus, stage: string, instance: string, log: Logger): Promise<WorkerGate> {
    const kv = await workersBucket(bus);
    const gate = new WorkerGate(kv, stage, presenceKey(stage, instance), log);
    await gate.tick();
    return gate;
  }

  get inUse(): boolean {
    return this.active || this.stopped;
  }

  /** Resolves once this worker is in use (or stopping). */
  async whenInUse(): Promise<void> {
    if (this.inUse) return;
    await new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  private async tick(): Promise<void> {
    if (this.stopped) return;
    try {
      await this.kv.put(this.key, String(Date.now()));
      const [live, wanted] = await Promise.all([liveWorkers(this.kv, this.stage), wantedWorkers(this.kv, this.stage)]);
      const active = inUse(live.indexOf(this.key), wanted);
      if (active !== this.active) this.log.info(active ? 'in use again' : 'not in use: the tuner wants fewer workers', { rank: live.indexOf(this.key), wanted, running: live.length });
      this.set(active);
    } catch (err) {
      // the bus is away: keep working as before (the presence entry just ages)
      this.log.debug('presence not updated', { reason: (err as Error).message });
    }
  }

  private set(active: boolean): void {
    this.active = active;
    if (this.inUse) for (const w of this.waiters.splice(0)) w();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    this.set(this.active);
    await this.kv.delete(this.key).catch(() => undefined);
  }
}
