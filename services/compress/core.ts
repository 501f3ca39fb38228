/** Compress's pure core: one compressed block per chunk body, with the compressor and level recorded. */
import type { Chunk } from '../../shared/model/chunk.js';
import { BlockCompressor } from '../../shared/codecs/block.js';
import type { Mode } from '../../shared/model/mode.js';

export class ChunkCompressor {
  private readonly block = new BlockCompressor();

  compress(chunk: Chunk, mode: Pick<Mode, 'compressor' | 'level'>): Chunk {
    if (chunk.mode.compressor !== 'none') throw new Error(`chunk ${chunk.seq}.${chunk.part} is already compressed`);
    if (mode.compressor === 'none') return chunk;
    const body = this.block.compress(chunk.body, mode.compressor, mode.level);
    const level = mode.compressor === 'zstd' ? mode.level : 0;
    return { ...chunk, mode: { ...chunk.mode, compressor: mode.compressor, level }, body };
  }
}
