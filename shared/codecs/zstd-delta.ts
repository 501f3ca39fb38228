/** zstd of a page with the base page at the same index as its dictionary (raw-content dictionary). */
import { zstd as binding } from './zstd-binding.js';
import { MalformedMessageError } from '../model/errors.js';
import { PAGE_SIZE } from '../image/pages.js';

const DELTA_LEVEL = 3;

export class ZstdDeltaEncoder {
  private readonly cctx = new binding.CCtx();
  private readonly out = Buffer.allocUnsafe(binding.compressBound(PAGE_SIZE));

  constructor(level = DELTA_LEVEL) {
    this.cctx.setParameter(binding.CParameter.compressionLevel, level);
    this.cctx.setParameter(binding.CParameter.checksumFlag, 0);
  }

  /** Undefined when not smaller than `limit`. */
  encode(page: Uint8Array, base: Uint8Array, limit = PAGE_SIZE): Uint8Array | undefined {
    this.cctx.loadDictionary(base);
    const written = this.cctx.compress2(this.out, page);
    return written < limit ? Buffer.from(this.out.subarray(0, written)) : undefined;
  }
}

export class ZstdDeltaDecoder {
  private readonly dctx = new binding.DCtx();

  decode(body: Uint8Array, base: Uint8Array): Uint8Array {
    const page = Buffer.allocUnsafe(PAGE_SIZE);
    let written: number;
    try {
      this.dctx.loadDictionary(base);
      written = this.dctx.decompress(page, body);
    } catch (err) {
      throw new MalformedMessageError(`zstd delta: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (written !== PAGE_SIZE) throw new MalformedMessageError(`zstd delta: decoded ${written} bytes, expected ${PAGE_SIZE}`);
    return page;
  }
}
