/**
 * A blob against a reference version of it (zstd with the reference as raw-content dictionary,
 * like `zstd --patch-from`): a VM's device state against its base snapshot's is a tiny fraction of
 * plain zstd's output; a chunk's changed pages against their base pages (delta=patch) come out
 * smaller than each page against its own base page or xor then zstd over the chunk, at about their
 * CPU. Layout: [length u32 LE][zstd frame].
 */
import { PageKind, type Chunk } from '../model/chunk.js';
import { MalformedMessageError } from '../model/errors.js';
import type { ImageId } from '../image/pages.js';
import { zstd as binding } from './zstd-binding.js';

/** Largest blob decoded: a device state is about 1 MB, a chunk's pages 1 MiB. */
export const MAX_PATCHED_BYTES = 64 * 1024 * 1024;

/** Reuses one compression context: a level-19 context costs more to set up than a chunk to patch. */
export class PatchEncoder {
  private readonly cctx = new binding.CCtx();

  encode(data: Uint8Array, reference: Uint8Array, level = 19): Buffer {
    const cctx = this.cctx;
    cctx.reset(binding.ResetDirective.parameters);
    cctx.setParameter(binding.CParameter.compressionLevel, level);
    // a damaged patch must fail, not decode into wrong pages or a wrong device state
    cctx.setParameter(binding.CParameter.checksumFlag, 1);
    // the window must reach back over the whole reference
    cctx.setParameter(binding.CParameter.windowLog, Math.max(20, Math.min(27, Math.ceil(Math.log2(reference.byteLength + data.byteLength + 1)))));
    cctx.loadDictionary(reference);
    const out = Buffer.allocUnsafe(4 + binding.compressBound(data.byteLength));
    out.writeUInt32LE(data.byteLength, 0);
    const written = cctx.compress2(out.subarray(4), data);
    return out.subarray(0, 4 + written);
  }
}

export class PatchDecoder {
  private readonly dctx = new binding.DCtx();

  constructor() {
    this.dctx.setParameter(binding.DParameter.windowLogMax, 27);
  }

  /** `expectedBytes`, where the caller knows the length: a patch claiming another fails. */
  decode(patch: Uint8Array, reference: Uint8Array, expectedBytes?: number): Buffer {
    if (patch.byteLength < 4) throw new MalformedMessageError('patch: truncated');
    const length = Buffer.from(patch.buffer, patch.byteOffset, 4).readUInt32LE(0);
    if (length > MAX_PATCHED_BYTES) throw new MalformedMessageError(`patch: claims ${length} bytes, more than ${MAX_PATCHED_BYTES}`);
    if (expectedBytes !== undefined && length !== expectedBytes) throw new MalformedMessageError(`patch: claims ${length} bytes, expected ${expectedBytes}`);
    const out = Buffer.allocUnsafe(length);
    let written: number;
    try {
      this.dctx.loadDictionary(reference);
      written = this.dctx.decompress(out, patch.subarray(4));
    } catch (err) {
      throw new MalformedMessageError(`patch: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (written !== length) throw new MalformedMessageError(`patch: decoded ${written} bytes, expected ${length}`);
    return out;
  }
}

/**
 * What a patch chunk (delta=patch) is compressed against: the base pages of its raw pages (the only
 * pages with a body), in their order. Source and destination build it here, so they agree.
 */
export function patchReference(chunk: Chunk, readBasePage: (image: ImageId, index: number) => Uint8Array): Buffer | undefined {
  const bases: Uint8Array[] = [];
  for (let i = 0; i < chunk.kind.length; i++) {
    if (chunk.kind[i] === PageKind.Raw) bases.push(readBasePage(chunk.image, chunk.pageIndex[i]!));
  }
  return bases.length > 0 ? Buffer.concat(bases) : undefined;
}

export function encodePatch(data: Uint8Array, reference: Uint8Array, level = 19): Buffer {
  return new PatchEncoder().encode(data, reference, level);
}

export function decodePatch(patch: Uint8Array, reference: Uint8Array): Buffer {
  return new PatchDecoder().decode(patch, reference);
}
