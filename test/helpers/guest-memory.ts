/**
 * The guest's RAM as a hash, to tell whether two QEMUs (or a QEMU and a RAM image) hold the same
 * memory: pc.ram below the VGA window and above the BIOS area, where a guest's own pages are.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { BaseFolder } from '../../shared/vm/base-manifest.js';
import type { QmpClient } from '../../shared/vm/qmp.js';

declare module '../../shared/vm/qmp.js' {
  interface QmpCommands {
    pmemsave: { args: { val: number; size: number; filename: string }; result: Record<string, never> };
  }
}

/** guest-physical [start, bytes) ranges of pc.ram compared, for a guest of `memoryBytes` */
export function ramRanges(memoryBytes: number): [number, number][] {
  return [
    [0, 0xa0000],
    [0x100000, memoryBytes - 0x100000],
  ];
}

/** SHA-256 of those ranges as QEMU holds them (pmemsave into `dir`, removed after). */
export async function qemuMemoryHash(qmp: QmpClient, dir: string, memoryBytes: number): Promise<string> {
  const hash = createHash('sha256');
  for (const [i, [val, size]] of ramRanges(memoryBytes).entries()) {
    const filename = join(dir, `pmem-${i}.ram`);
    await qmp.execute('pmemsave', { val, size, filename });
    hash.update(readFileSync(filename));
    await rm(filename);
  }
  return hash.digest('hex');
}

/** SHA-256 of those ranges as a base's memory.img holds them (pc.ram at its offset there). */
export async function imageMemoryHash(base: BaseFolder, memoryBytes: number): Promise<string> {
  const pcRam = base.manifest.ramBlocks.find((b) => b.idstr === 'pc.ram');
  if (!pcRam) throw new Error(`the base ${base.dir} has no pc.ram block`);
  const hash = createHash('sha256');
  const fh = await open(base.memoryPath, 'r');
  try {
    for (const [val, size] of ramRanges(memoryBytes)) {
      const buf = Buffer.alloc(size);
      await fh.read(buf, 0, size, pcRam.offset + val);
      hash.update(buf);
    }
  } finally {
    await fh.close();
  }
  return hash.digest('hex');
}
