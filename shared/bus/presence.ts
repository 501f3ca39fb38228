/**
 * Which workers of a stage run, and how many of them the tuner wants in use. A worker keeps a key
 * alive in the workers bucket (entries expire PRESENCE_TTL_MS after their last write, so a killed
 * worker drops out by itself); the tuner counts the live keys and writes `want.STAGE`. A worker
 * whose rank (its key's place among the live ones, sorted) is at or past the wanted count takes no
 * work. Without a wish (no adaptive migration, or a tuner silent for PRESENCE_TTL_MS) all work.
 * Those that follow the bucket (the tuner, each gated worker) keep a view of it from a watch
 * (PresenceView) rather than listing its keys at each tick.
 */
import { Kvm, type KV, type KvWatchEntry } from '@nats-io/kv';
import type { Bus } from './bus.js';
import type { Logger } from '../telemetry/log.js';
import { watchBucket } from './registry.js';
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

/** Keys of the stage's running workers, sorted, listed once (what follows the bucket keeps a PresenceView). */
export async function liveWorkers(kv: KV, stage: string): Promise<string[]> {
  // a heartbeat written while the keys are listed can show up twice
  const keys = new Set<string>();
  for await (const k of await kv.keys(`${stage}.*`)) keys.add(k);
  return [...keys].sort();
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

/**
 * The bucket as a watch delivers it: each key with when it was last written, aged out here as the
 * bucket ages it out (an entry that expires leaves no marker for a watch). Listing the keys costs
 * an ordered consumer each time, in the caller and in nats-server, and the tuner and every gated
 * worker would list them twice a second; a watch delivers each heartbeat once.
 */
export class PresenceView {
  /** key -> when it was last written (performance.now() here) */
  private readonly seenAtMs = new Map<string, number>();
  private readonly values = new Map<string, string>();
  private readonly listeners: ((key: string) => void)[] = [];
  private stopWatch: (() => void) | undefined;

  private constructor() {}

  static async start(kv: KV): Promise<PresenceView> {
    const view = new PresenceView();
    const watch = await watchBucket(kv, { key: '>' }, (entry) => view.apply(entry));
    view.stopWatch = watch.stop;
    watch.done.catch(() => undefined);
    return view;
  }

  private apply(entry: KvWatchEntry): void {
    if (entry.operation !== 'PUT') {
      this.seenAtMs.delete(entry.key);
      this.values.delete(entry.key);
    } else {
      // a value from before the watch began is as old as its entry (clocks of one server and this host)
      const ageMs = entry.isUpdate ? 0 : Math.min(PRESENCE_TTL_MS, Math.max(0, Date.now() - entry.created.getTime()));
      this.seenAtMs.set(entry.key, performance.now() - ageMs);
      this.values.set(entry.key, entry.string());
    }
    for (const l of this.listeners) l(entry.key);
  }

  private fresh(key: string): boolean {
    const at = this.seenAtMs.get(key);
    return at !== undefined && performance.now() - at < PRESENCE_TTL_MS;
  }

  /** `key` has been written and not deleted since the watch began */
  has(key: string): boolean {
    return this.seenAtMs.has(key);
  }

  /** Keys of the stage's running workers, sorted: a worker's rank is its place here. */
  live(stage: string): string[] {
    return [...this.seenAtMs.keys()].filter((k) => k.startsWith(`${stage}.`) && this.fresh(k)).sort();
  }

  /** The tuner's wish for the stage, while it is fresh. */
  wanted(stage: string): number | undefined {
    const key = `want.${stage}`;
    if (!this.fresh(key)) return undefined;
    const n = Number(this.values.get(key));
    return Number.isInteger(n) && n >= 1 ? n : undefined;
  }

  /** calls `listener` with the key of each entry the watch delivers */
  onChange(listener: (key: string) => void): void {
    this.listeners.push(listener);
  }

  stop(): void {
    this.stopWatch?.();
  }
}

/** A worker's side: its heartbeat, and whether it should take work now. */
export class WorkerGate {
  private active = true;
  private waiters: (() => void)[] = [];
  private stopped = false;
  private readonly timer: NodeJS.Timeout;

  private constructor(
    private readonly kv: KV,
    private readonly view: PresenceView,
    private readonly stage: string,
    private readonly key: string,
    private readonly log: Logger,
  ) {
    this.timer = setInterval(() => void this.tick(), TICK_MS);
    // a wish applies when it is written, not at the next tick
    view.onChange((k) => {
      if (k === `want.${stage}`) this.check();
    });
  }

  static async start(bus: Bus, stage: string, instance: string, log: Logger): Promise<WorkerGate> {
    const kv = await workersBucket(bus);
    const view = await PresenceView.start(kv);
    const gate = new WorkerGate(kv, view, stage, presenceKey(stage, instance), log);
    await gate.tick();
    // the watch has caught up once it delivers this worker's own first heartbeat: the keys written
    // before it are in the view, and so is the rank
    for (let i = 0; i < 40 && !view.has(gate.key); i++) await new Promise((r) => setTimeout(r, 25));
    gate.check();
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
    } catch (err) {
      // the bus is away: keep working as before (the presence entry just ages)
      this.log.debug('presence not updated', { reason: (err as Error).message });
      return;
    }
    this.check();
  }

  private check(): void {
    if (this.stopped) return;
    const live = this.view.live(this.stage);
    const wanted = this.view.wanted(this.stage);
    const active = inUse(live.indexOf(this.key), wanted);
    if (active !== this.active) this.log.info(active ? 'in use again' : 'not in use: the tuner wants fewer workers', { rank: live.indexOf(this.key), wanted, running: live.length });
    this.set(active);
  }

  private set(active: boolean): void {
    this.active = active;
    if (this.inUse) for (const w of this.waiters.splice(0)) w();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    this.set(this.active);
    this.view.stop();
    await this.kv.delete(this.key).catch(() => undefined);
  }
}
