/**
 * `handoff profile`: generates a workload, runs dedup's core over it, then every profiled mode's
 * delta and compression (see services/tuner/profile.ts), and gives the tuner's profile of it.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ChunkBuilder, dirtyPagesOf } from '../services/capture/core.js';
import { DeltaEncoder } from '../services/delta/core.js';
import { HashLocationMap, addBaseIndex, dedupChunk } from '../services/dedup/core.js';
import type { Profile } from '../services/tuner/model.js';
import { PROFILED_MODES, cpuMs, measureModes } from '../services/tuner/profile.js';
import { loadBaseIndex } from '../shared/image/base-index.js';
import type { Chunk } from '../shared/model/chunk.js';
import { PAGE_SIZE, type ImageId } from '../shared/image/pages.js';
import { generateImageSet, type ImageSet } from '../shared/testdata/images.js';

/** Dedup's output for an image set: the chunks the mode-dependent stages see, and what it cost to get there. */
async function dedupOutput(images: ImageSet): Promise<{ chunks: Chunk[]; fixedCpuMs: number; blocks: number }> {
  const indexes = await Promise.all([loadBaseIndex(images.baseMemory), loadBaseIndex(images.baseDisk)]);
  const base = new HashLocationMap();
  addBaseIndex(base, 0, indexes[0].hashes);
  addBaseIndex(base, 1, indexes[1].hashes);
  const sent = new HashLocationMap();
  const chunks: Chunk[] = [];
  const start = process.cpuUsage();
  for (const [image, path] of [[0, images.memory], [1, images.disk]] as [ImageId, string][]) {
    const data = await readFile(path);
    const builder = new ChunkBuilder({ migrationId: 'profile', round: 0, image, parts: 1 }, 256);
    const flush = (): void => {
      for (const slice of builder.take()) chunks.push(dedupChunk(slice, base, sent).chunk);
    };
    for (const page of dirtyPagesOf(data, 0, indexes[image].hashes)) if (builder.add(page)) flush();
    if (builder.pending) flush();
  }
  const blocks = chunks.reduce((n, c) => n + c.bodyRawLength / PAGE_SIZE, 0);
  return { chunks, fixedCpuMs: cpuMs(start), blocks };
}

export async function measureProfile(images: ImageSet, workload: string): Promise<Profile> {
  const { chunks, fixedCpuMs, blocks } = await dedupOutput(images);
  const baseFiles = await Promise.all([readFile(images.baseMemory), readFile(images.baseDisk)]);
  const encoder = new DeltaEncoder((image, index) => baseFiles[image].subarray(index * PAGE_SIZE, (index + 1) * PAGE_SIZE));
  const modes = [...measureModes(chunks, encoder, PROFILED_MODES)];
  return { workload, createdAt: new Date().toISOString(), fixedCpuMsPerBlock: fixedCpuMs / blocks, modes };
}

/** `handoff profile`: generates a workload of the given size and profiles every mode on it. */
export async function profileGenerated(memoryBytes: number, diskBytes: number, seed = 1): Promise<Profile> {
  const dir = await mkdtemp(join(tmpdir(), 'handoff-profile-'));
  try {
    const images = await generateImageSet({ dir, memoryBytes, diskBytes, seed });
    return await measureProfile(images, `generated VM, ${memoryBytes >> 20} MiB memory + ${diskBytes >> 20} MiB disk, seed ${seed}`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
