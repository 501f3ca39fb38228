/**
 * A serving destination started before its base is in place (a cloudlet's container up before its
 * volume is filled) waits for it, saying what it waits for, and then receives; it does not exit.
 */
import assert from 'node:assert/strict';
import { copyFile, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { spawnReceiverProcess, waitForBase } from '../cli/receive.js';
import { stopProcess } from '../shared/actor/child.js';
import type { Logger } from '../shared/telemetry/log.js';
import { generateImageSet } from '../shared/testdata/images.js';

describe('a serving receiver before its base is in place', { timeout: 120_000 }, () => {
  test('waitForBase names the missing files and returns once they exist', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'handoff-wait-base-'));
    const lines: string[] = [];
    const say = (msg: string, fields?: Record<string, unknown>): void => void lines.push(`${msg} ${JSON.stringify(fields ?? {})}`);
    const log: Logger = { debug: say, info: say, warn: say, error: say, child: () => log };
    try {
      const memory = join(dir, 'memory.img');
      const disk = join(dir, 'disk.img');
      let done = false;
      const waited = waitForBase([memory, disk], log, 50).then(() => (done = true));
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(done, false, 'returned with the base missing');
      assert.ok(lines.some((l) => l.includes('waiting for the base') && l.includes(memory) && l.includes(disk)), lines.join('\n'));
      await copyFile('/dev/null', memory);
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(done, false, 'returned with the disk missing');
      await copyFile('/dev/null', disk);
      await waited;
      assert.ok(lines.some((l) => l.includes('base found')), lines.join('\n'));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('receive --serve started with no base listens once the base arrives', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'handoff-serve-base-'));
    try {
      const images = await generateImageSet({ dir: join(dir, 'made'), memoryBytes: 1 << 20, diskBytes: 1 << 20, seed: 7 });
      const baseDir = join(dir, 'base');
      const started = spawnReceiverProcess({ baseMemory: join(baseDir, 'memory.img'), baseDisk: join(baseDir, 'disk.img'), outDir: join(dir, 'out'), serve: true });
      let listening = false;
      void started.then(() => (listening = true), () => undefined);
      await new Promise((r) => setTimeout(r, 2000));
      assert.equal(listening, false, 'listening with no base');
      await mkdir(baseDir);
      await copyFile(images.baseMemory, join(baseDir, 'memory.img'));
      await copyFile(images.baseDisk, join(baseDir, 'disk.img'));
      const receiver = await started;
      try {
        assert.match(receiver.address, /:\d+$/);
        assert.equal(receiver.child.exitCode, null);
      } finally {
        await stopProcess(receiver.child, 5000);
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
