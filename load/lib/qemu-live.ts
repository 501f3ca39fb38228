/** QEMU's own live migration between two QEMUs over a benchmark's shaped link: the comparison every VM benchmark makes. */
import type { QmpClient } from '../../shared/vm/qmp.js';

export interface QemuMigrationRun {
  /** false: pre-copy had not converged within the limit and was cancelled */
  converged: boolean;
  /** bytes the link's counter saw go out during the migration */
  wireBytes: number;
  /** QEMU's own figures, where it converged */
  totalSeconds?: number;
  downtimeMs?: number;
}

/**
 * Migrates `source` into `target` (started with -incoming defer) at `uri`: plain pre-copy, or
 * multifd (2 channels) with zstd at level 3. A pre-copy that cannot keep up with the guest never
 * ends: it is cancelled after `limitSeconds` and reported as such.
 */
export async function qemuLiveMigration(source: QmpClient, target: QmpClient, uri: string, options: { multifd: boolean; limitSeconds: number; sentBytes: () => number }): Promise<QemuMigrationRun> {
  if (options.multifd) {
    for (const qmp of [source, target]) {
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
      await qmp.execute('migrate-set-parameters', { 'multifd-channels': 2, 'multifd-compression': 'zstd', 'multifd-zstd-level': 3 });
    }
  }
  await target.execute('migrate-incoming', { uri });
  const sentBefore = options.sentBytes();
  await source.execute('migrate', { uri });
  const converged = await source.waitMigration(options.limitSeconds * 1000).then(
    () => true,
    (err: unknown) => {
      if (!/ still /.test((err as Error).message)) throw err;
      return false;
    },
  );
  const wireBytes = options.sentBytes() - sentBefore;
  if (!converged) {
    await source.execute('migrate_cancel').catch(() => undefined);
    return { converged, wireBytes };
  }
  const info = await source.execute('query-migrate');
  return { converged, wireBytes, totalSeconds: (info['total-time'] ?? 0) / 1000, ...(info.downtime !== undefined ? { downtimeMs: info.downtime } : {}) };
}
