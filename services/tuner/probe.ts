/**
 * The ratio probe: every profiled mode's output ratio on a sample of the migrating VM's own changed
 * pages, run by the tuner in its own process while capture waits for its first look (`shareWith`),
 * or in a process of its own (probe-process.ts). The shipped profile comes from another workload,
 * and modes do not keep their relative ratios from one workload to another. All modes probed on the
 * same pages compare modes, not content.
 */
import { closeSync, openSync, readSync } from 'node:fs';
import type { Chunk } from '../../shared/model/chunk.js';
import type { ImagePair } from '../../shared/model/migration.js';
import type { Mode } from '../../shared/model/mode.js';
import { PAGE_SIZE, strongHash, type ImageId } from '../../shared/image/pages.js';
import { threadCpuMs } from '../../shared/cpu/thread-cpu.js';
import { ChunkBuilder, type DirtyPage } from '../capture/core.js';
import { HashLocationMap, dedupChunk } from '../dedup/core.js';
import { DeltaEncoder } from '../delta/core.js';
import { modeKey, type Profile } from './model.js';
import { cpuMs, measureModes } from './profile.js';

export interface ProbeOptions {
  /** dirty pages to probe on */
  pages: number;
  /** consecutive pages read at each place (the pipeline compresses a chunk of neighbours as one) */
  runPages: number;
  /** places read at most, spread over both images: where few pages changed, the probe reads little and stops */
  maxRuns: number;
  /** the first pages found (a spread sample too): where the costly modes are probed */
  subsamplePages: number;
  /** pages per chunk, as the migration's */
  chunkPages: number;
  random: () => number;
  /**
   * Run beside other work in one process (the tuner's): yield to the event loop after each mode
   * and stop, with undefined, once this is aborted.
   */
  shareWith?: AbortSignal;
}

export const DEFAULT_PROBE_OPTIONS: ProbeOptions = { pages: 256, runPages: 16, maxRuns: 512, subsamplePages: 64, chunkPages: 256, random: Math.random };

/**
 * Modes whose profiled CPU per block is above this are probed on the subsample only: zstd-19 would
 * take most of the probe's CPU on the whole sample. Patch-9 is probed on the whole: within a tie of
 * patch-3 at a little more CPU, its ratio decides.
 */
export const PROBE_MAX_CPU_MS_PER_BLOCK = 0.08;

/** What to probe: `modes` on the whole sample; each of `costly` on the subsample beside `reference`. */
export interface ProbePlan {
  modes: Mode[];
  costly: { mode: Mode; reference: Mode }[];
}

/**
 * The profile's modes, the costly ones each beside the strongest cheap level of its delta and
 * compressor: their ratio cannot come from the profile's proportions, which differ from workload to
 * workload by as much as decides between modes on a slow link. `costlyWanted` leaves out costly
 * modes whose ratio cannot decide (the tuner's test: they could not win with a better ratio than
 * thought): they take as much CPU on the subsample as every cheap mode on the whole, and the tuner
 * may be waiting for the probe.
 */
export function probePlan(profile: Profile, costlyWanted: (mode: Mode) => boolean = () => true): ProbePlan {
  const cheap = profile.modes.filter((m) => m.deltaCpuMsPerBlock + m.compressCpuMsPerBlock <= PROBE_MAX_CPU_MS_PER_BLOCK).map((m) => m.mode);
  const costly: ProbePlan['costly'] = [];
  for (const m of profile.modes) {
    if (cheap.includes(m.mode) || !costlyWanted(m.mode)) continue;
    const reference = cheap.filter((c) => c.delta === m.mode.delta && c.compressor === m.mode.compressor).sort((a, b) => b.level - a.level)[0];
    if (reference) costly.push({ mode: m.mode, reference });
  }
  return { modes: cheap, costly };
}

/** fewer dirty pages than this in the sample: too few to say anything, the profile stays */
export const MIN_PROBE_PAGES = 32;

export interface ProbeResult {
  /** output ratio per mode key, on the sampled pages */
  ratios: Map<string, number>;
  /** the sample's blocks (pages dedup kept in full) and the pages read to find them */
  blocks: number;
  pagesRead: number;
  /** CPU of the thread it ran on (of the process where /proc does not tell) */
  cpuMs: number;
}

/** what the probe reads of a migration: its images' files */
type ImageFiles = Pick<ImagePair, 'base' | 'current' | 'bytes'>;
type Images = { memory: ImageFiles; disk: ImageFiles };
/** what the probe needs of a migration: its images and its chunk size */
export type ProbeImages = Images & { chunkPages?: number };

/**
 * Places to read, `runs` of them spread over both images in proportion to their size, each at a
 * random offset within its stretch, in random order: stopping early still leaves a spread sample.
 */
export function probePlaces(pagesOf: readonly [number, number], options: Pick<ProbeOptions, 'runPages' | 'maxRuns' | 'random'>): { image: ImageId; index: number }[] {
  const total = pagesOf[0] + pagesOf[1];
  const places: { image: ImageId; index: number }[] = [];
  for (const image of [0, 1] as const) {
    const pages = pagesOf[image];
    if (pages === 0) continue;
    const runs = Math.max(1, Math.min(Math.floor(pages / options.runPages), Math.round((options.maxRuns * pages) / total)));
    const stretch = pages / runs;
    for (let r = 0; r < runs; r++) {
      const slack = Math.max(0, stretch - options.runPages);
      places.push({ image, index: Math.floor(r * stretch + options.random() * slack) });
    }
  }
  for (let i = places.length - 1; i > 0; i--) {
    const j = Math.floor(options.random() * (i + 1));
    [places[i], places[j]] = [places[j]!, places[i]!];
  }
  return places;
}

/** In a shared process (`shareWith` given): lets the others run, then says whether to stop. */
async function yieldedAndStopped(shareWith: AbortSignal | undefined): Promise<boolean> {
  if (!shareWith) return false;
  await new Promise((resolve) => setImmediate(resolve));
  return shareWith.aborted;
}

/**
 * Dirty pages of the images (differing from the base page at the same index), as dedup would pass
 * them on (zero pages and repeats within the sample dropped; pages equal to some other base page
 * are not looked up: that would need the base's whole index), with their base pages.
 */
export async function sampleDirtyPages(
  d: Images,
  options: ProbeOptions,
): Promise<{ chunks: Chunk[]; subsample: Chunk[]; basePages: Map<string, Uint8Array>; pagesRead: number }> {
  // read in the caller's thread, a place at a time: asynchronous reads, each through libuv's pool,
  // took longer on one core
  const files: { base: number; current: number }[] = [];
  try {
    for (const pair of [d.memory, d.disk]) {
      const base = openSync(pair.base, 'r');
      try {
        files.push({ base, current: openSync(pair.current, 'r') });
      } catch (err) {
        closeSync(base);
        throw err;
      }
    }
    const pagesOf = [Math.floor(d.memory.bytes / PAGE_SIZE), Math.floor(d.disk.bytes / PAGE_SIZE)] as const;
    /** in the order found: places are in random order, so the first few are a spread sample too */
    const found: { image: ImageId; page: DirtyPage }[] = [];
    const basePages = new Map<string, Uint8Array>();
    let pagesRead = 0;
    for (const { image, index } of probePlaces(pagesOf, options)) {
      if (found.length >= options.pages) break;
      if (await yieldedAndStopped(options.shareWith)) break;
      const count = Math.min(options.runPages, pagesOf[image] - index);
      const current = Buffer.alloc(count * PAGE_SIZE);
      const base = Buffer.alloc(count * PAGE_SIZE);
      const bytesRead = readSync(files[image]!.current, current, 0, current.byteLength, index * PAGE_SIZE);
      readSync(files[image]!.base, base, 0, base.byteLength, index * PAGE_SIZE);
      const pages = Math.floor(bytesRead / PAGE_SIZE);
      pagesRead += pages;
      for (let p = 0; p < pages; p++) {
        const page = current.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
        const basePage = base.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
        if (page.equals(basePage)) continue;
        found.push({ image, page: { index: index + p, page, hash: strongHash(page) } });
        basePages.set(`${image}:${index + p}`, basePage);
      }
    }
    return { chunks: chunksOf(found, options.chunkPages), subsample: chunksOf(found.slice(0, options.subsamplePages), options.chunkPages), basePages, pagesRead };
  } finally {
    for (const f of files) {
      closeSync(f.base);
      closeSync(f.current);
    }
  }
}

/** Sampled pages as dedup would pass them on: per image in index order, zero pages and repeats dropped. */
function chunksOf(found: { image: ImageId; page: DirtyPage }[], chunkPages: number): Chunk[] {
  const chunks: Chunk[] = [];
  const sent = new HashLocationMap();
  for (const image of [0, 1] as const) {
    const builder = new ChunkBuilder({ migrationId: 'probe', round: 0, image, parts: 1 }, chunkPages);
    const flush = (): void => {
      for (const slice of builder.take()) chunks.push(dedupChunk(slice, new HashLocationMap(), sent).chunk);
    };
    const pages = found.filter((f) => f.image === image).map((f) => f.page);
    for (const page of pages.sort((a, b) => a.index - b.index)) if (builder.add(page)) flush();
    if (builder.pending) flush();
  }
  return chunks;
}

/**
 * Every mode's ratio on a sample of the migration's dirty pages: the plan's modes on the whole
 * sample, its costly ones on the subsample beside their reference mode, and scaled by the
 * reference's ratio on the whole (same pages for both, so the ratio between them is the modes').
 * Undefined when the sample is too small (or `shareWith` was aborted).
 */
export async function probeRatios(d: ProbeImages, plan: ProbePlan, options: Partial<ProbeOptions> = {}): Promise<ProbeResult | undefined> {
  const o: ProbeOptions = { ...DEFAULT_PROBE_OPTIONS, ...(d.chunkPages ? { chunkPages: d.chunkPages } : {}), ...options };
  const start = { thread: threadCpuMs(), process: process.cpuUsage() };
  const { chunks, subsample, basePages, pagesRead } = await sampleDirtyPages(d, o);
  const blocks = chunks.reduce((n, c) => n + c.bodyRawLength / PAGE_SIZE, 0);
  if (blocks < MIN_PROBE_PAGES) return undefined;
  const encoder = new DeltaEncoder((image, index) => {
    const page = basePages.get(`${image}:${index}`);
    if (!page) throw new Error(`probe: no base page ${image}:${index}`);
    return page;
  });
  const ratios = new Map<string, number>();
  if (await yieldedAndStopped(o.shareWith)) return undefined;
  for (const cost of measureModes(chunks, encoder, plan.modes)) {
    ratios.set(modeKey(cost.mode), cost.ratio);
    if (await yieldedAndStopped(o.shareWith)) return undefined;
  }
  const costly = plan.costly.filter((c) => ratios.has(modeKey(c.reference)));
  if (costly.length > 0) {
    const onSubsample = new Map<string, number>();
    const modes = [...new Map([...costly.map((c) => c.mode), ...costly.map((c) => c.reference)].map((m) => [modeKey(m), m])).values()];
    for (const cost of measureModes(subsample, encoder, modes)) {
      onSubsample.set(modeKey(cost.mode), cost.ratio);
      if (await yieldedAndStopped(o.shareWith)) return undefined;
    }
    for (const { mode, reference } of costly) {
      const sub = onSubsample.get(modeKey(mode));
      const subReference = onSubsample.get(modeKey(reference));
      if (sub !== undefined && subReference) ratios.set(modeKey(mode), Math.min(1, ratios.get(modeKey(reference))! * (sub / subReference)));
    }
  }
  const threadNow = threadCpuMs();
  return { ratios, blocks, pagesRead, cpuMs: start.thread !== undefined && threadNow !== undefined ? threadNow - start.thread : cpuMs(start.process) };
}
