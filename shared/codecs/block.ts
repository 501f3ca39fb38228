/** Whole-body compression of a chunk: none, lz4 or zstd at a level. Decoding never allocates past the expected size. */
import { compressSync as lz4Compress, uncompressSync as lz4Uncompress } from 'lz4-napi';
import { zstd as binding } from './zstd-binding.js';
import { MalformedMessageError } from '../model/errors.js';
import type { Compressor } from '../model/mode.js';

export class BlockCompressor {
  private readonly cctx = new binding.CCtx();
  private level = -1;
  private out = Buffer.alloc(0);

  compress(data: Uint8Array, compressor: Compressor, level: number): Uint8Array {
    if (compressor === 'none') return data;
    if (compressor === 'lz4') return lz4Compress(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
    if (level !== this.level) {
      this.cctx.reset(binding.ResetDirective.parameters);
      this.cctx.setParameter(binding.CParameter.compressionLevel, level);
      this.level = level;
    }
    const bound = binding.compressBound(data.byteLength);
    if (this.out.byteLength < bound) this.out = Buffer.allocUnsafe(bound);
    const written = this.cctx.compress2(this.out, data);
    return Buffer.from(this.out.subarray(0, written));
  }
}

export class BlockDecompressor {
  private readonly dctx = new binding.DCtx();

  /** `rawLength` comes from the validated chunk header; the output is exactly that long or an error. */
  decompress(data: Uint8Array, compressor: Compressor, rawLength: number): Uint8Array {
    if (compressor === 'none') {
      if (data.byteLength !== rawLength) throw new MalformedMessageError(`body has ${data.byteLength} bytes, expected ${rawLength}`);
      return data;
    }
    if (compressor === 'lz4') {
      // lz4-napi prepends the decoded size (u32 LE): check it before letting it allocate.
      if (data.byteLength < 4) throw new MalformedMessageError('lz4 body: truncated');
      const claimed = Buffer.from(data.buffer, data.byteOffset, 4).readUInt32LE(0);
      if (claimed !== rawLength) throw new MalformedMessageError(`lz4 body: claims ${claimed} bytes, expected ${rawLength}`);
      try {
        const out = lz4Uncompress(data);
        if (out.byteLength !== rawLength) throw new Error(`decoded ${out.byteLength} bytes`);
        return out;
      } catch (err) {
        throw new MalformedMessageError(`lz4 body: ${err instanceof Error ? err.message : String(err)}`);
      }
    }
    const out = Buffer.allocUnsafe(rawLength);
    let written: number;
    try {
      written = rawLength === 0 && data.byteLength === 0 ? 0 : this.dctx.decompress(out, data);
    } catch (err) {
      throw new MalformedMessageError(`zstd body: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (written !== rawLength) throw new MalformedMessageError(`zstd body: decoded ${written} bytes, expected ${rawLength}`);
    return out;
  }
}
