/** Dedup actor: one instance per hash partition; base index loaded once per base pair. */
import { BaseMismatchError } from '../../shared/model/errors.js';
import { loadBaseIndex } from '../../shared/image/base-index.js';
import type { MigrationDescriptor } from '../../shared/model/migration.js';
import { nextStage, type StageActor } from '../../shared/actor/stage.js';
import { HashLocationMap, addBaseIndex, dedupChunk } from './core.js';

export function createDedupActor(partition: number): StageActor {
  const baseMaps = new Map<string, Promise<HashLocationMap>>();
  /** pages sent, per migration, in its current round: a later round rewrites locations, so references stay within a round */
  const sentMaps = new Map<string, { round: number; map: HashLocationMap }>();
  const basesOf = new Map<string, string>();

  const loadBases = async (d: MigrationDescriptor): Promise<HashLocationMap> => {
    const map = new HashLocationMap();
    const [memory, disk] = await Promise.all([loadBaseIndex(d.memory.base), loadBaseIndex(d.disk.base)]);
    for (const [index, pair] of [[memory, d.memory], [disk, d.disk]] as const) {
      if (index.contentHash !== pair.baseHash) {
        throw new BaseMismatchError(`base ${pair.base} has content hash ${index.contentHash}, the migration expects ${pair.baseHash}`);
      }
    }
    addBaseIndex(map, 0, memory.hashes);
    addBaseIndex(map, 1, disk.hashes);
    return map;
  };

  return {
    name: 'dedup',
    input: 'dedup',
    partition,
    async prepare(d, log) {
      const key = `${d.memory.baseHash}:${d.disk.baseHash}`;
      if (!baseMaps.has(key)) baseMaps.set(key, loadBases(d));
      const map = await baseMaps.get(key)!;
      basesOf.set(d.migrationId, key);
      sentMaps.set(d.migrationId, { round: 0, map: new HashLocationMap() });
      log.info('base index loaded', { basePages: map.size });
    },
    async handle(chunk, ctx) {
      const base = await baseMaps.get(basesOf.get(chunk.migrationId)!)!;
      let sent = sentMaps.get(chunk.migrationId)!;
      if (chunk.round !== sent.round) {
        // rounds arrive one after another (capture waits for each to be delivered)
        sent = { round: chunk.round, map: new HashLocationMap() };
        sentMaps.set(chunk.migrationId, sent);
      }
      const { chunk: out, counts } = dedupChunk(chunk, base, sent.map);
      return { outputs: [{ chunk: out, to: nextStage('dedup', ctx.mode, out) }], counts: { ...counts } };
    },
    forget(migrationId) {
      // the base maps stay: the next migration from the same base reuses them
      sentMaps.delete(migrationId);
      basesOf.delete(migrationId);
    },
  };
}
