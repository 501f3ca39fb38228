/**
 * Receiver's pure core: turn chunks back into pages and put them in the rebuilt images.
 * Undoes compression and delta, resolves references (also to pages that arrive later), checks every
 * page against the source's per-page check, and ignores duplicates and older rounds.
 */
import { PageKind, chunkKey, type Chunk } from '../../shared/model/chunk.js';
import { BlockDecompressor } from '../../shared/codecs/block.js';
import { PatchDecoder, patchReference } from '../../shared/codecs/patch.js';
import { xorDecode } from '../../shared/codecs/xor.js';
import { ZstdDeltaDecoder } from '../../shared/codecs/zstd-delta.js';
import { MalformedMessageError, VerificationError } from '../../shared/model/errors.js';
import { CHECK_BYTES, IMAGES, PAGE_SIZE, STRONG_HASH_BYTES, ZERO_PAGE, digestOfPageHashes, pageCheck, strongHash, type ImageId } from '../../shared/image/pages.js';

/** Where pages come from and go to; files in the service, memory in tests. */
export interface PageStore {
  pageCount(image: ImageId): number;
  readBase(image: ImageId, index: number): Uint8Array;
  readRebuilt(image: ImageId, index: number): Uint8Array;
  writeRebuilt(image: ImageId, index: number, page: Uint8Array): void;
}

interface PendingRef {
  image: ImageId;
  index: number;
  round: number;
  check: bigint;
}

export interface ApplyResult {
  duplicate: boolean;
  pagesWritten: number;
  pagesDeferred: number;
}

export class Rebuilder {
  private readonly decompressor = new BlockDecompressor();
  private readonly zstdDelta = new ZstdDeltaDecoder();
  private readonly patch = new PatchDecoder();
  private readonly received = new Set<string>();
  /** per image, per page: last round written + 1 (0 = never written in this migration) */
  private readonly writtenRound: Uint16Array[];
  /** target "image:index" -> pages waiting for it */
  private readonly pending = new Map<string, PendingRef[]>();
  private pendingCount = 0;
  private readonly expected = new Map<number, number>();
  /** per image: the strong hash of every page as rebuilt (base's where nothing was written) */
  private readonly pageHashes: Buffer[];
  pagesWritten = 0;

  /** `baseHashes`: the base images' hash indexes (see shared/image/base-index.ts), one per image. */
  constructor(
    private readonly store: PageStore,
    readonly migrationId: string,
    baseHashes: [Uint8Array, Uint8Array],
  ) {
    this.writtenRound = [0, 1].map((image) => new Uint16Array(store.pageCount(image as ImageId)));
    this.pageHashes = [0, 1].map((image) => {
      const hashes = baseHashes[image]!;
      if (hashes.byteLength !== store.pageCount(image as ImageId) * STRONG_HASH_BYTES) throw new RangeError(`base hash index of the ${IMAGES[image]} image does not match its size`);
      return Buffer.from(hashes);
    });
  }

  /** The rebuilt image's digest, comparable with the source's (hash list of its pages). */
  imageDigest(image: ImageId): string {
    return digestOfPageHashes(this.pageHashes[image]!);
  }

  /** The source says round `round` consists of `slices` chunk slices. */
  expect(round: number, slices: number): void {
    this.expected.set(round, slices);
  }

  get receivedSlices(): number {
    return this.received.size;
  }

  get pendingReferences(): number {
    return this.pendingCount;
  }

  /** True when every announced slice arrived and no reference waits for its target. */
  get complete(): boolean {
    if (this.expected.size === 0 || this.pendingCount > 0) return false;
    let total = 0;
    for (const slices of this.expected.values()) total += slices;
    return this.received.size === total;
  }

  apply(chunk: Chunk): ApplyResult {
    if (chunk.migrationId !== this.migrationId) {
      throw new MalformedMessageError(`chunk for migration ${chunk.migrationId} reached migration ${this.migrationId}`);
    }
    const key = chunkKey(chunk);
    if (this.received.has(key)) return { duplicate: true, pagesWritten: 0, pagesDeferred: 0 };
    this.validateIndices(chunk);
    const body = chunk.mode.delta === 'patch' ? this.unpatch(chunk) : this.decompressor.decompress(chunk.body, chunk.mode.compressor, chunk.bodyRawLength);
    let offset = 0;
    let written = 0;
    let deferred = 0;
    const n = chunk.pageIndex.length;
    const checks = Buffer.from(chunk.check.buffer, chunk.check.byteOffset, chunk.check.byteLength);
    for (let i = 0; i < n; i++) {
      const index = chunk.pageIndex[i]!;
      const kind = chunk.kind[i]!;
      const len = chunk.bodyLength[i]!;
      const pageBody = body.subarray(offset, offset + len);
      offset += len;
      const check = checks.readBigUInt64LE(i * CHECK_BYTES);
      if (kind === PageKind.Sent) {
        const target = { image: chunk.refImage[i]! as ImageId, index: chunk.refIndex[i]! };
        // the target as of this round: a location is rewritten by later rounds of a live handoff,
        // and the source's reference means its content in the referencing page's round
        if (this.writtenRound[target.image]![target.index]! < chunk.round + 1) {
          this.defer(target, { image: chunk.image, index, round: chunk.round, check });
          deferred++;
          continue;
        }
        this.put({ image: chunk.image, index, round: chunk.round, check }, this.store.readRebuilt(target.image, target.index), kind);
        written++;
        continue;
      }
      const page = this.materialize(chunk.image, index, kind, pageBody, chunk.refImage[i]! as ImageId, chunk.refIndex[i]!);
      if (this.put({ image: chunk.image, index, round: chunk.round, check }, page, kind)) written++;
    }
    this.received.add(key);
    return { duplicate: false, pagesWritten: written, pagesDeferred: deferred };
  }

  private validateIndices(chunk: Chunk): void {
    const pages = this.store.pageCount(chunk.image);
    for (let i = 0; i < chunk.pageIndex.length; i++) {
      const index = chunk.pageIndex[i]!;
      if (index >= pages) {
        throw new MalformedMessageError(`chunk ${chunkKey(chunk)}: page index ${index} is past the end of the ${IMAGES[chunk.image]} image (${pages} pages)`);
      }
      const kind = chunk.kind[i]!;
      if (kind === PageKind.Base || kind === PageKind.Sent) {
        const refImage = chunk.refImage[i]! as ImageId;
        if (chunk.refIndex[i]! >= this.store.pageCount(refImage)) {
          throw new MalformedMessageError(`chunk ${chunkKey(chunk)}: reference to page ${chunk.refIndex[i]} is past the end of the ${IMAGES[refImage]} image`);
        }
      }
    }
  }

  /** A patch chunk's body, against the base pages of its raw pages (see DeltaEncoder). */
  private unpatch(chunk: Chunk): Uint8Array {
    const reference = patchReference(chunk, (image, index) => this.store.readBase(image, index)) ?? Buffer.alloc(0);
    try {
      return this.patch.decode(chunk.body, reference, chunk.bodyRawLength);
    } catch (err) {
      throw new MalformedMessageError(`chunk ${chunkKey(chunk)}: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  private materialize(image: ImageId, index: number, kind: number, body: Uint8Array, refImage: ImageId, refIndex: number): Uint8Array {
    switch (kind) {
      case PageKind.Raw:
        return body;
      case PageKind.Zero:
        return ZERO_PAGE;
      case PageKind.Base:
        return this.store.readBase(refImage, refIndex);
      case PageKind.Xor:
        return xorDecode(body, this.store.readBase(image, index));
      case PageKind.ZstdDelta:
        return this.zstdDelta.decode(body, this.store.readBase(image, index));
      default:
        throw new MalformedMessageError(`unknown page kind ${kind}`);
    }
  }

  /** Checks and writes one page, then any references that waited for it. False if an older round. */
  private put(ref: PendingRef, page: Uint8Array, kind: number): boolean {
    const rounds = this.writtenRound[ref.image]!;
    if (rounds[ref.index]! > ref.round + 1) return false; // a newer round already wrote it
    if (page.byteLength !== PAGE_SIZE || pageCheck(page) !== ref.check) {
      throw new VerificationError(
        `${IMAGES[ref.image]} page ${ref.index} (kind ${kind}, round ${ref.round}) does not match the source's check: refusing to write it`,
      );
    }
    this.store.writeRebuilt(ref.image, ref.index, page);
    strongHash(page).copy(this.pageHashes[ref.image]!, ref.index * STRONG_HASH_BYTES);
    rounds[ref.index] = ref.round + 1;
    this.pagesWritten++;
    const waiting = this.pending.get(`${ref.image}:${ref.index}`);
    if (waiting) {
      this.pending.delete(`${ref.image}:${ref.index}`);
      this.pendingCount -= waiting.length;
      for (const w of waiting) this.put(w, page, PageKind.Sent);
    }
    return true;
  }

  private defer(target: { image: ImageId; index: number }, ref: PendingRef): void {
    const key = `${target.image}:${target.index}`;
    const list = this.pending.get(key);
    if (list) list.push(ref);
    else this.pending.set(key, [ref]);
    this.pendingCount++;
  }
}
