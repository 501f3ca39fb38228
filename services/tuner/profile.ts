/**
 * The offline profile: each mode's CPU cost per block and output ratio, measured on a workload by
 * running the real cores in one process (`handoff profile`, cli/profile.ts). A default profile
 * ships with the project (services/tuner/default-profile.json); `npm run profile` measures it again.
 */
import { readFile } from 'node:fs/promises';
import { ChunkCompressor } from '../compress/core.js';
import type { DeltaEncoder } from '../delta/core.js';
import type { Chunk } from '../../shared/model/chunk.js';
import { DELTA_ALGORITHMS, isMode, type Mode } from '../../shared/model/mode.js';
import { PAGE_SIZE } from '../../shared/image/pages.js';
import type { ModeCost, Profile } from './model.js';

export const DEFAULT_PROFILE_PATH = new URL('../../../services/tuner/default-profile.json', import.meta.url);

const COMPRESSIONS: Pick<Mode, 'compressor' | 'level'>[] = [
  { compressor: 'none', level: 0 },
  { compressor: 'lz4', level: 0 },
  { compressor: 'zstd', level: 1 },
  { compressor: 'zstd', level: 3 },
  { compressor: 'zstd', level: 9 },
  { compressor: 'zstd', level: 19 },
];

/** patch's levels: zstd-1 against a dictionary sends much more than zstd-3 */
const PATCH_LEVELS = [3, 9, 19];

/**
 * The modes the tuner chooses among: every delta x compression but those a patch at a level of
 * about their cost always beats. A patch compresses the chunk's pages with their base pages as
 * dictionary; compressing the chunk after a per-page zstd delta (delta=zstd with lz4 or zstd) or
 * zstd-19 without delta sees the same pages with less to go on, and the ratio probe would spend a
 * third of its time on them.
 */
export const PROFILED_MODES: Mode[] = DELTA_ALGORITHMS.flatMap((delta): Mode[] => {
  if (delta === 'patch') return PATCH_LEVELS.map((level) => ({ delta, compressor: 'zstd' as const, level }));
  if (delta === 'zstd') return [{ delta, compressor: 'none', level: 0 }];
  return COMPRESSIONS.filter((c) => !(delta === 'none' && c.level === 19)).map((c) => ({ delta, ...c }));
});

export function isProfile(value: unknown): value is Profile {
  if (typeof value !== 'object' || value === null) return false;
  const p = value as Profile;
  return (
    typeof p.fixedCpuMsPerBlock === 'number' &&
    Array.isArray(p.modes) &&
    p.modes.length > 0 &&
    p.modes.every((m) => isMode(m.mode) && [m.deltaCpuMsPerBlock, m.compressCpuMsPerBlock, m.ratio].every((v) => typeof v === 'number' && v >= 0))
  );
}

export async function loadProfile(path?: string): Promise<Profile> {
  const where = path ?? DEFAULT_PROFILE_PATH;
  const value: unknown = JSON.parse(await readFile(where, 'utf8'));
  if (!isProfile(value)) throw new Error(`${String(where)} is not a tuner profile`);
  return value;
}

/** CPU ms this process has used since `start` */
export const cpuMs = (start: NodeJS.CpuUsage): number => {
  const u = process.cpuUsage(start);
  return (u.user + u.system) / 1000;
};

/**
 * Every mode's delta and compression over dedup's output chunks: CPU and output ratio per block.
 * Each delta once (modes sharing one have the same delta cost), then each mode's compression, one
 * mode at a time, so a caller sharing its thread (the tuner's probe) can yield between.
 */
export function* measureModes(chunks: Chunk[], encoder: DeltaEncoder, modes: Mode[]): Generator<ModeCost> {
  const blocks = chunks.reduce((n, c) => n + c.bodyRawLength / PAGE_SIZE, 0);
  if (blocks === 0) return;
  const compressor = new ChunkCompressor();
  for (const delta of DELTA_ALGORITHMS) {
    const ofDelta = modes.filter((m) => m.delta === delta);
    if (ofDelta.length === 0) continue;
    if (delta === 'patch') {
      // compressed in delta, at each mode's level: its whole cost is delta's
      for (const mode of ofDelta) {
        let outBytes = 0;
        const t = process.cpuUsage();
        for (const chunk of chunks) outBytes += encoder.encode(chunk, delta, mode.level).chunk.body.byteLength;
        yield { mode, deltaCpuMsPerBlock: cpuMs(t) / blocks, compressCpuMsPerBlock: 0, ratio: outBytes / (blocks * PAGE_SIZE) };
      }
      continue;
    }
    let t = process.cpuUsage();
    const encoded = chunks.map((chunk) => encoder.encode(chunk, delta).chunk);
    const deltaMs = cpuMs(t);
    for (const mode of ofDelta) {
      let outBytes = 0;
      t = process.cpuUsage();
      for (const chunk of encoded) outBytes += compressor.compress(chunk, mode).body.byteLength;
      const compressMs = cpuMs(t);
      yield { mode, deltaCpuMsPerBlock: deltaMs / blocks, compressCpuMsPerBlock: compressMs / blocks, ratio: outBytes / (blocks * PAGE_SIZE) };
    }
  }
}
