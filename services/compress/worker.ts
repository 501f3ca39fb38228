/** Runs on a worker thread: zstd-napi and lz4-napi are synchronous and must not block the actor's event loop. */
import type { Chunk } from '../../shared/model/chunk.js';
import type { Mode } from '../../shared/model/mode.js';
import { threadCpuMs } from '../../shared/cpu/thread-cpu.js';
import { ChunkCompressor } from './core.js';

const compressor = new ChunkCompressor();

export interface CompressTask {
  chunk: Chunk;
  mode: Pick<Mode, 'compressor' | 'level'>;
}

export interface CompressResult {
  chunk: Chunk;
  /** CPU the codec took on this thread (undefined: not measurable here) */
  codecCpuMs?: number;
}

export default function compressTask({ chunk, mode }: CompressTask): CompressResult {
  const start = threadCpuMs();
  const out = compressor.compress(chunk, mode);
  const end = threadCpuMs();
  return { chunk: out, ...(start !== undefined && end !== undefined ? { codecCpuMs: end - start } : {}) };
}
