/**
 * The receiver's pure checks: whether a source's handshake fits this destination, and the result of
 * a rebuild (the images' hashes against the source's).
 */
import type { ImageDigests, RebuildResult } from '../../shared/model/migration.js';
import type { Hello } from '../../shared/wire/frames.js';
import { streamRefusal, type StreamDestination } from './stream-resume.js';

/** What a source's handshake is checked against. */
export interface Destination {
  baseHashes: ImageDigests;
  /** the base images' sizes */
  bytes: { memory: number; disk: number };
  /** it can resume VMs (started with --resume-vm) */
  resumesVms: boolean;
  /** it can resume the source's own machine from QEMU's stream (started with --base DIR --resume-vm) */
  stream?: StreamDestination;
}

/** Why this destination refuses `hello`, or undefined where it takes it. */
export function refusalOf(hello: Hello, d: Destination): string | undefined {
  const src = hello.baseHashes;
  if (src.memory !== d.baseHashes.memory || src.disk !== d.baseHashes.disk) {
    return `destination base differs from the source's: memory source ${src.memory} destination ${d.baseHashes.memory}; disk source ${src.disk} destination ${d.baseHashes.disk}`;
  }
  if (hello.bytes.memory !== d.bytes.memory || hello.bytes.disk !== d.bytes.disk) {
    return `image sizes differ: source memory ${hello.bytes.memory} disk ${hello.bytes.disk}, destination base memory ${d.bytes.memory} disk ${d.bytes.disk}`;
  }
  if (hello.vm && !d.resumesVms) return "this destination cannot resume VMs (start it with --resume-vm, the base VM's kernel, initrd and device state)";
  if (hello.vm && hello.vm.memoryBytes !== d.bytes.memory) return `the VM has ${hello.vm.memoryBytes} bytes of memory, the base memory image ${d.bytes.memory}`;
  if (hello.machine && !d.stream) return "this destination cannot resume the source's machine (start it with --base DIR --resume-vm)";
  if (hello.machine) return streamRefusal(hello.machine, d.stream!);
  return undefined;
}

/** What a rebuild did, whatever its outcome. */
export interface RebuildCounts {
  pagesWritten: number;
  slices: number;
  duplicateSlices: number;
}

/** The result of a rebuild whose images hash to `rebuiltHashes`: verified where they are the source's. */
export function verifiedResult(rebuiltHashes: ImageDigests, sourceHashes: ImageDigests, counts: RebuildCounts, rebuildSeconds: number): RebuildResult {
  const mismatch = (['memory', 'disk'] as const).filter((k) => rebuiltHashes[k] !== sourceHashes[k]);
  if (mismatch.length === 0) return { verified: true, rebuiltHashes, ...counts, rebuildSeconds };
  const differences = mismatch.map((k) => `${k}: source ${sourceHashes[k]}, rebuilt ${rebuiltHashes[k]}`).join('; ');
  return { verified: false, reason: `rebuilt ${mismatch.join(' and ')} image hash differs from the source's (${differences})`, rebuiltHashes, ...counts, rebuildSeconds };
}

/** The result of a rebuild that failed before its images could be hashed. */
export function failedResult(reason: string, counts: RebuildCounts, rebuildSeconds: number): RebuildResult {
  return { verified: false, reason, rebuiltHashes: { memory: '', disk: '' }, ...counts, rebuildSeconds };
}
