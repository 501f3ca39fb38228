/** Per-process views of the migrations bucket (descriptors) and the config bucket (wanted mode). */
import { KvWatchInclude, type KV } from '@nats-io/kv';
import { isDescriptor, type MigrationDescriptor } from './migration.js';
import { isModeConfig, type Mode, type ModeConfig } from './mode.js';

export class DescriptorCache {
  private readonly cache = new Map<string, Promise<MigrationDescriptor>>();
  private stopWatch: (() => void) | undefined;

  constructor(private readonly bucket: KV) {}

  /**
   * Also follows the end of migrations (their descriptor deleted when the control path finishes):
   * forgets them and calls `onEnd`, so a long-running actor drops per-migration state.
   */
  static async following(bucket: KV, onEnd: (migrationId: string) => void): Promise<DescriptorCache> {
    const cache = new DescriptorCache(bucket);
    const iter = await bucket.watch({ key: '>', include: KvWatchInclude.UpdatesOnly });
    cache.stopWatch = () => iter.stop();
    void (async () => {
      for await (const entry of iter) {
        if (entry.operation === 'PUT') continue;
        cache.forget(entry.key);
        onEnd(entry.key);
      }
    })().catch(() => undefined);
    return cache;
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
    if (!entry || entry.length === 0) throw new UnknownMigrationError(`unknown migration id ${migrationId}: no descriptor in the migrations bucket`);
    const value: unknown = entry.json();
    if (!isDescriptor(value)) throw new UnknownMigrationError(`migration ${migrationId}: descriptor is malformed`);
    return value;
  }

  forget(migrationId: string): void {
    this.cache.delete(migrationId);
  }
}

export class UnknownMigrationError extends Error {
  override name = 'UnknownMigrationError';
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
    const iter = await bucket.watch({ key: '>' });
    watcher.stopWatch = () => iter.stop();
    void (async () => {
      for await (const entry of iter) {
        if (watcher.stopped) break;
        if (entry.operation !== 'PUT') {
          watcher.modes.delete(entry.key);
          continue;
        }
        try {
          const value: unknown = entry.json();
          if (isModeConfig(value)) watcher.modes.set(entry.key, value);
        } catch {
          // a malformed config value is ignored: the last good mode stays in force
        }
      }
    })();
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
