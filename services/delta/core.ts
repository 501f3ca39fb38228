/**
 * Delta's pure core: encode each raw page against the base page at the same index, when smaller;
 * or (patch) compress the chunk's raw pages as one against their base pages.
 */
import { PageKind, type Chunk } from '../../shared/model/chunk.js';
import { PatchEncoder, patchReference } from '../../shared/codecs/patch.js';
import { xorEncode } from '../../shared/codecs/xor.js';
import { ZstdDeltaEncoder } from '../../shared/codecs/zstd-delta.js';
import type { DeltaAlgorithm } from '../../shared/model/mode.js';
import { PAGE_SIZE, type ImageId } from '../../shared/image/pages.js';

/** Reads page `index` of base image `image` (4096 bytes). */
export type BasePageReader = (image: ImageId, index: number) => Uint8Array;

export interface DeltaCounts {
  encoded: number;
  kept: number;
  /**
   * CPU the codec took (the encoding alone, not reading base pages): the tuner scales another
   * codec's profile by it and adds the rest as the stage's handling (undefined: no clock)
   */
  codecCpuMs?: number;
}

/** CPU ms of the calling thread so far (undefined where it cannot be told) */
export type CpuClock = () => number | undefined;

export class DeltaEncoder {
  private readonly zstdDelta = new ZstdDeltaEncoder();
  private readonly patchEncoder = new PatchEncoder();

  /** `codecClock`: times the codec apart from reading base pages (see DeltaCounts.codecCpuMs) */
  constructor(
    private readonly readBasePage: BasePageReader,
    private readonly codecClock?: CpuClock,
  ) {}

  /** `patchLevel`: the zstd level of a patch (the mode's level); other deltas have none. */
  encode(chunk: Chunk, algorithm: DeltaAlgorithm, patchLevel = 3): { chunk: Chunk; counts: DeltaCounts } {
    if (chunk.mode.compressor !== 'none') throw new Error('delta takes uncompressed chunks only');
    const counts: DeltaCounts = { encoded: 0, kept: 0 };
    if (algorithm === 'none' || chunk.mode.delta !== 'none') return { chunk, counts };
    if (algorithm === 'patch') return this.patch(chunk, patchLevel);
    const n = chunk.pageIndex.length;
    const kind = new Uint8Array(chunk.kind);
    const bodyLength = new Uint32Array(chunk.bodyLength);
    // base pages first, then the codec over them: its CPU is timed apart from the reads
    const bases: (Uint8Array | undefined)[] = Array.from({ length: n }, (_, i) => (chunk.kind[i] === PageKind.Raw ? this.readBasePage(chunk.image, chunk.pageIndex[i]!) : undefined));
    const bodies: Uint8Array[] = [];
    const codecStart = this.codecClock?.();
    let offset = 0;
    for (let i = 0; i < n; i++) {
      const len = chunk.bodyLength[i]!;
      const body = chunk.body.subarray(offset, offset + len);
      offset += len;
      const base = bases[i];
      if (!base) continue;
      const encoded = algorithm === 'xor' ? xorEncode(body, base) : this.zstdDelta.encode(body, base);
      if (encoded) {
        kind[i] = algorithm === 'xor' ? PageKind.Xor : PageKind.ZstdDelta;
        bodyLength[i] = encoded.byteLength;
        bodies.push(encoded);
        counts.encoded++;
      } else {
        bodies.push(body);
        counts.kept++;
      }
    }
    this.timeCodec(counts, codecStart);
    const body = Buffer.concat(bodies);
    return {
      chunk: { ...chunk, mode: { ...chunk.mode, delta: algorithm }, kind, bodyLength, body, bodyRawLength: body.byteLength },
      counts,
    };
  }

  /**
   * The chunk's body (its raw pages, in order: the only pages with a body after dedup) as one zstd
   * frame with their base pages, in the same order, as dictionary. Pages keep their kind: the
   * receiver reads the same base pages to undo it.
   */
  private patch(chunk: Chunk, level: number): { chunk: Chunk; counts: DeltaCounts } {
    const reference = patchReference(chunk, this.readBasePage);
    if (!reference) return { chunk, counts: { encoded: 0, kept: 0 } };
    const codecStart = this.codecClock?.();
    const body = this.patchEncoder.encode(chunk.body, reference, level);
    const counts: DeltaCounts = { encoded: reference.byteLength / PAGE_SIZE, kept: 0 };
    this.timeCodec(counts, codecStart);
    return { chunk: { ...chunk, mode: { delta: 'patch', compressor: 'zstd', level }, body }, counts };
  }

  private timeCodec(counts: DeltaCounts, start: number | undefined): void {
    const end = start === undefined ? undefined : this.codecClock?.();
    if (start !== undefined && end !== undefined) counts.codecCpuMs = end - start;
  }
}
