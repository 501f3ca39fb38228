/** `handoff demo`: two cloudlets on one machine, a generated VM, one handoff, a summary. */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Mode } from '../shared/mode.js';
import { formatMode } from '../shared/mode.js';
import { generateImageSet } from '../shared/testdata/images.js';
import { formatBytes, parseRateBps, parseSizeBytes } from '../shared/units.js';
import { migrate } from './migrate.js';
import { formatSummary } from './summary.js';

export interface DemoOptions {
  memorySize: string;
  diskSize: string;
  bandwidth: string;
  mode: Mode;
  compressWorkers: number;
  dedupInstances: number;
  json: boolean;
  dir?: string;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const addr = server.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      server.close(() => resolve(port));
    });
  });
}

export async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const data of createReadStream(path, { highWaterMark: 4 * 1024 * 1024 })) h.update(data as Buffer);
  return h.digest('hex');
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

    const port = await freePort();
    const outDir = join(destDir, 'rebuilt');
    const main = fileURLToPath(new URL('./main.js', import.meta.url));
    const receiver = spawn(
      process.execPath,
      [main, 'receive', '--listen', `127.0.0.1:${port}`, '--base-memory', destBaseMemory, '--base-disk', destBaseDisk, '--out', outDir, '--json'],
      { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, HANDOFF_LOG_LEVEL: process.env.HANDOFF_LOG_LEVEL ?? 'warn' } },
    );
    let receiverOut = '';
    receiver.stdout!.on('data', (d: Buffer) => (receiverOut += d.toString()));
    const receiverExit = new Promise<number>((resolve) => receiver.once('exit', (code) => resolve(code ?? 1)));
    await new Promise<void>((resolve, reject) => {
      let err = '';
      receiver.stderr!.on('data', (d: Buffer) => {
        err += d.toString();
        if (err.includes('receiver listening')) resolve();
      });
      receiver.once('exit', (code) => reject(new Error(`destination receiver exited (${code}) before listening:\n${err}`)));
    });
    receiver.stderr!.pipe(process.stderr);
    say(`destination cloudlet listening on 127.0.0.1:${port}; handing off at ${o.bandwidth}, ${formatMode(o.mode)}, ${o.compressWorkers} compress workers`);

    const summary = await migrate({
      baseMemory: images.baseMemory,
      memory: images.memory,
      baseDisk: images.baseDisk,
      disk: images.disk,
      to: `127.0.0.1:${port}`,
      mode: o.mode,
      compressWorkers: o.compressWorkers,
      dedupInstances: o.dedupInstances,
      bandwidthCapBps: parseRateBps(o.bandwidth),
      spawnActors: true,
      progress: true,
    });
    const receiverCode = await receiverExit;
    // belt and braces: compare the files themselves, not only what the receiver reported
    let identical = false;
    if (summary.verified && receiverCode === 0) {
      const pairs: [string, string][] = [
        [images.memory, join(outDir, 'memory.img')],
        [images.disk, join(outDir, 'disk.img')],
      ];
      const hashes = await Promise.all(pairs.flat().map(sha256File));
      identical = hashes[0] === hashes[1] && hashes[2] === hashes[3];
    }
    if (o.json) console.log(JSON.stringify({ ...summary, filesIdentical: identical, receiver: receiverOut.trim() ? JSON.parse(receiverOut) : undefined }));
    else {
      console.log(formatSummary(summary));
      console.log(identical ? 'source and rebuilt image files compared: byte-identical' : 'source and rebuilt image files DIFFER or are missing');
    }
    return summary.verified && identical ? 0 : 1;
  } finally {
    if (!o.dir) await rm(dir, { recursive: true, force: true });
  }
}
