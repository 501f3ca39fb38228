/** Per-process views of the migrations bucket (descriptors) and the config bucket (wanted mode). */
import { type KV, type KvWatchEntry, type KvWatchOptions } from '@nats-io/kv';
import { isDescriptor, type MigrationDescriptor } from '../model/migration.js';
import { isModeConfig, type Mode, type ModeConfig } from '../model/mode.js';

/**
 * Hands each entry a watch of `bucket` delivers to `onEntry` until `stop`; `done` settles when the
 * watch ends (rejected if it failed). What every per-process view of a bucket is kept by.
 */
export async function watchBucket(bucket: KV, options: KvWatchOptions, onEntry: (entry: KvWatchEntry) => void): Promise<{ stop: () => void; done: Promise<void> }> {
  const iter = await bucket.watch(options);
  const done = (async () => {
    for await (const entry of iter) onEntry(entry);
  })();
  return { stop: () => iter.stop(), done };
}

/** A migrations-bucket entry's descriptor; throws where it is not one. */
function descriptorOf(migrationId: string, entry: { json(): unknown }): MigrationDescriptor {
  const value: unknown = entry.json();
  if (!isDescriptor(value)) throw new UnknownMigrationError(`migration ${migrationId}: descriptor is malformed`);
  return value;
}

export class DescriptorCache {
  private readonly cache = new Map<string, Promise<MigrationDescriptor>>();
  private stopWatch: (() => void) | undefined;

  constructor(private readonly bucket: KV) {}

  /**
   * Also follows the bucket: a migration's descriptor, there or put later, is kept and handed to
   * `onPut` (an actor can prepare for it before its first chunk comes); the end of a migration (its
   * descriptor deleted when the control path finishes) is forgotten and handed to `onEnd`, so a
   * long-running actor drops per-migration state.
   */
  static async following(bucket: KV, onEnd: (migrationId: string) => void, onPut?: (descriptor: MigrationDescriptor) => void): Promise<DescriptorCache> {
    const cache = new DescriptorCache(bucket);
    await cache.follow(onEnd, onPut);
    return cache;
  }

  /** Follows the bucket (see `following`): for a caller that hands the cache out before its first entry comes. */
  async follow(onEnd: (migrationId: string) => void, onPut?: (descriptor: MigrationDescriptor) => void): Promise<void> {
    const watch = await watchBucket(this.bucket, { key: '>' }, (entry) => {
      if (entry.operation !== 'PUT') {
        this.forget(entry.key);
        onEnd(entry.key);
        return;
      }
      let value: MigrationDescriptor;
      try {
        value = descriptorOf(entry.key, entry);
      } catch {
        return; // a malformed descriptor is said by `get`, to the chunk that needs it
      }
      if (value.migrationId !== entry.key) return;
      this.cache.set(entry.key, Promise.resolve(value));
      onPut?.(value);
    });
    this.stopWatch = watch.stop;
    watch.done.catch(() => undefined);
  }

  stop(): void {
    this.stopWatch?.();
  }

  get(migrationId: string): Promise<MigrationDescriptor> {
    let found = this.cache.get(migrationId);
    if (!found) {
      found = this.load(migrationId);
      this.cache.set(migrationId, found);
      found.catch(() => this.cache.delete(migrationId));
    }
    return found;
  }

  private async load(migrationId: string): Promise<MigrationDescriptor> {
    const entry = await this.bucket.get(migrationId);
    // a deleted descriptor: the migration has ended, not a stray id
    if (entry && entry.operation !== 'PUT') throw new EndedMigrationError(`migration ${migrationId} has ended: its descriptor is deleted`);
    if (!entry || entry.length === 0) throw new UnknownMigrationError(`unknown migration id ${migrationId}: no descriptor in the migrations bucket`);
    return descriptorOf(migrationId, entry);
  }

  forget(migrationId: string): void {
    this.cache.delete(migrationId);
  }
}

export class UnknownMigrationError extends Error {
  override name = 'UnknownMigrationError';
}

/** A chunk or event of a migration that has ended (its descriptor deleted): dropped, not an error. */
export class EndedMigrationError extends Error {
  override name = 'EndedMigrationError';
}

/**
 * The mode each migration wants now, kept current by a watch on the config bucket: a stage applies
 * a change from its next chunk on, and a stage that starts late still gets the latest value.
 */
export class ModeWatcher {
  private readonly modes = new Map<string, ModeConfig>();
  private stopped = false;
  private stopWatch: (() => void) | undefined;

  private constructor() {}

  static async start(bucket: KV): Promise<ModeWatcher> {
    const watcher = new ModeWatcher();
    const watch = await watchBucket(bucket, { key: '>' }, (entry) => {
      if (watcher.stopped) return;
      if (entry.operation !== 'PUT') {
        watcher.modes.delete(entry.key);
        return;
      }
      try {
        const value: unknown = entry.json();
        if (isModeConfig(value)) watcher.modes.set(entry.key, value);
      } catch {
        // a malformed config value is ignored: the last good mode stays in force
      }
    });
    watcher.stopWatch = watch.stop;
    void watch.done;
    return watcher;
  }

  get(migrationId: string, fallback: Mode): ModeConfig {
    return this.modes.get(migrationId) ?? fallback;
  }

  stop(): void {
    this.stopped = true;
    this.stopWatch?.();
  }
}
