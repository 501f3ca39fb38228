/** The encoding mode: delta algorithm x compressor x level. It travels in every chunk. */

/**
 * Against the base VM: none; each page against its base page (xor, zstd with the page as
 * dictionary); or `patch`: the chunk's pages compressed as one with their base pages as dictionary
 * (like `zstd --patch-from`), which finds both a page's likeness to its base and its neighbours'.
 * Patch compresses in the delta stage (compress has no base images), so its compressor is zstd.
 */
export const DELTA_ALGORITHMS = ['none', 'xor', 'zstd', 'patch'] as const;
export type DeltaAlgorithm = (typeof DELTA_ALGORITHMS)[number];
export const COMPRESSORS = ['none', 'lz4', 'zstd'] as const;
export type Compressor = (typeof COMPRESSORS)[number];

export interface Mode {
  delta: DeltaAlgorithm;
  compressor: Compressor;
  /** zstd level (1..19); ignored by other compressors. */
  level: number;
}

/**
 * The mode as the tuner publishes it, with the compression it would choose now for each other delta
 * (`compressFor`). After a switch, chunks delta-encoded under the earlier mode (or passed on without
 * delta) still reach compress, and the new mode's compression suits its own delta only: a switch
 * from xor+zstd-3 to delta=zstd without compression would send the xor-encoded chunks queued at
 * compress uncompressed, a mode no one chose.
 */
export interface ModeConfig extends Mode {
  compressFor?: Partial<Record<DeltaAlgorithm, Pick<Mode, 'compressor' | 'level'>>>;
}

/** The mode compress applies to a chunk whose delta (applied or skipped upstream) is `applied`. */
export function compressionFor(config: ModeConfig, applied: DeltaAlgorithm): Mode {
  const c = applied === config.delta ? config : (config.compressFor?.[applied] ?? config);
  return { delta: applied, compressor: c.compressor, level: c.level };
}

export const DEFAULT_MODE: Mode = { delta: 'xor', compressor: 'zstd', level: 3 };

/**
 * Where an adaptive migration starts (its first chunks go before the tuner's first look): a chunk
 * against its base pages at zstd-3 is close to the best static mode at every bandwidth, at the CPU
 * of zstd-3.
 */
export const ADAPTIVE_START_MODE: Mode = { delta: 'patch', compressor: 'zstd', level: 3 };

export const ZSTD_MIN_LEVEL = 1;
export const ZSTD_MAX_LEVEL = 19;

/** Parses `none`, `lz4`, `zstd` or `zstd:LEVEL`. */
export function parseCompression(text: string): Pick<Mode, 'compressor' | 'level'> {
  const [name, levelText] = text.split(':');
  if (name === 'none' || name === 'lz4') {
    if (levelText !== undefined) throw new Error(`mode ${text}: ${name} takes no level`);
    return { compressor: name, level: 0 };
  }
  if (name === 'zstd') {
    const level = levelText === undefined ? 3 : Number(levelText);
    if (!Number.isInteger(level) || level < ZSTD_MIN_LEVEL || level > ZSTD_MAX_LEVEL) {
      throw new Error(`mode ${text}: zstd level must be an integer ${ZSTD_MIN_LEVEL}..${ZSTD_MAX_LEVEL}`);
    }
    return { compressor: 'zstd', level };
  }
  throw new Error(`unknown mode ${JSON.stringify(text)}: expected none, lz4 or zstd:LEVEL`);
}

export function parseDelta(text: string): DeltaAlgorithm {
  if ((DELTA_ALGORITHMS as readonly string[]).includes(text)) return text as DeltaAlgorithm;
  throw new Error(`unknown delta ${JSON.stringify(text)}: expected ${DELTA_ALGORITHMS.join(', ')}`);
}

export function isMode(value: unknown): value is Mode {
  if (typeof value !== 'object' || value === null) return false;
  const m = value as Record<string, unknown>;
  return (DELTA_ALGORITHMS as readonly unknown[]).includes(m.delta) && isCompression(m) && (m.delta !== 'patch' || m.compressor === 'zstd');
}

/** Throws, naming the cause, where a mode's parts do not go together. */
export function checkMode(mode: Mode): Mode {
  if (mode.delta === 'patch' && mode.compressor !== 'zstd') throw new Error(`delta patch compresses with zstd: give --mode zstd:LEVEL, not ${mode.compressor}`);
  return mode;
}

export function isModeConfig(value: unknown): value is ModeConfig {
  if (!isMode(value)) return false;
  const f = (value as { compressFor?: unknown }).compressFor;
  if (f === undefined) return true;
  if (typeof f !== 'object' || f === null) return false;
  return Object.entries(f).every(([delta, c]) => (DELTA_ALGORITHMS as readonly string[]).includes(delta) && typeof c === 'object' && c !== null && isCompression(c as Record<string, unknown>));
}

function isCompression(m: Record<string, unknown>): boolean {
  return (
    (COMPRESSORS as readonly unknown[]).includes(m.compressor) &&
    typeof m.level === 'number' &&
    Number.isInteger(m.level) &&
    m.level >= 0 &&
    m.level <= ZSTD_MAX_LEVEL
  );
}

export function formatMode(mode: Mode): string {
  const comp = mode.compressor === 'zstd' ? `zstd:${mode.level}` : mode.compressor;
  return `delta=${mode.delta} ${comp}`;
}
