/** `handoff demo`: two cloudlets on one machine, a generated VM, one handoff, a summary. */
import { copyFile, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Mode } from '../shared/model/mode.js';
import { formatMode } from '../shared/model/mode.js';
import { hashImageFile } from '../shared/image/pages.js';
import { generateImageSet } from '../shared/testdata/images.js';
import { formatBytes, parseRateBps, parseSizeBytes } from '../shared/config/units.js';
import { migrate } from './migrate.js';
import { spawnReceiverProcess } from './receive.js';
import { formatSummary } from './summary.js';

export interface DemoOptions {
  memorySize: string;
  diskSize: string;
  bandwidth: string;
  mode: Mode;
  adaptive: boolean;
  compressWorkers: number;
  dedupInstances: number;
  json: boolean;
  dir?: string;
}

export async function demo(o: DemoOptions): Promise<number> {
  const say = (text: string): void => {
    process.stderr.write(`${text}\n`);
  };
  const memoryBytes = parseSizeBytes(o.memorySize);
  const diskBytes = parseSizeBytes(o.diskSize);
  const dir = o.dir ?? (await mkdtemp(join(tmpdir(), 'handoff-demo-')));
  const sourceDir = join(dir, 'source');
  const destDir = join(dir, 'destination');
  try {
    say(`generating a VM: ${formatBytes(memoryBytes)} memory, ${formatBytes(diskBytes)} disk, base and current (in ${dir})`);
    const images = await generateImageSet({ dir: sourceDir, memoryBytes, diskBytes });
    await mkdir(destDir, { recursive: true });
    // the destination cloudlet holds its own copy of the base VM
    const destBaseMemory = join(destDir, 'base-memory.img');
    const destBaseDisk = join(destDir, 'base-disk.img');
    await copyFile(images.baseMemory, destBaseMemory);
    await copyFile(images.baseDisk, destBaseDisk);

    const outDir = join(destDir, 'rebuilt');
    const receiver = await spawnReceiverProcess({ baseMemory: destBaseMemory, baseDisk: destBaseDisk, outDir, forwardLogs: true });
    say(`destination cloudlet listening on ${receiver.address}; handing off at ${o.bandwidth}, ${o.adaptive ? 'adaptive mode' : formatMode(o.mode)}, ${o.compressWorkers} compress workers`);

    const summary = await migrate({
      ...images,
      to: receiver.address,
      mode: o.mode,
      adaptive: o.adaptive,
      compressWorkers: o.compressWorkers,
      dedupInstances: o.dedupInstances,
      bandwidthCapBps: parseRateBps(o.bandwidth),
      spawnActors: true,
      progress: true,
    });
    const { code: receiverCode, result: received } = await receiver.exited;
    // belt and braces: compare the files themselves, not only what the receiver reported
    let identical = false;
    if (summary.verified && receiverCode === 0) {
      const pairs: [string, string][] = [
        [images.memory, join(outDir, 'memory.img')],
        [images.disk, join(outDir, 'disk.img')],
      ];
      const hashes = await Promise.all(pairs.flat().map(hashImageFile));
      identical = hashes[0] === hashes[1] && hashes[2] === hashes[3];
    }
    if (o.json) console.log(JSON.stringify({ ...summary, filesIdentical: identical, receiver: received }));
    else {
      console.log(formatSummary(summary));
      console.log(identical ? 'source and rebuilt image files compared: byte-identical' : 'source and rebuilt image files DIFFER or are missing');
    }
    return summary.verified && identical ? 0 : 1;
  } finally {
    if (!o.dir) await rm(dir, { recursive: true, force: true });
  }
}
