/** Runs on a worker thread: zstd-napi and lz4-napi are synchronous and must not block the actor's event loop. */
import type { Chunk } from '../../shared/chunk.js';
import type { Mode } from '../../shared/mode.js';
import { ChunkCompressor } from './core.js';

const compressor = new ChunkCompressor();

export interface CompressTask {
  chunk: Chunk;
  mode: Pick<Mode, 'compressor' | 'level'>;
}

export default function compressTask({ chunk, mode }: CompressTask): Chunk {
  return compressor.compress(chunk, mode);
}
