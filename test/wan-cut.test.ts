/**
 * The shaped link cut for 5 s mid-transfer (the source's end of the veth down, then up): the
 * sender notices the silence, reconnects when the link is back, resends what was not acknowledged,
 * and the images arrive identical. Needs root for the network namespaces (CI runs as root).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { spawnReceiverProcess } from '../cli/receive.js';
import type { MigrationSummary } from '../cli/summary.js';
import { createShapedLink, type ShapedLink } from '../load/lib/wan.js';
import { hashImageFile } from '../shared/image/pages.js';
import { makeWorkspace, type Workspace } from './helpers/cloudlets.js';

const MAIN = fileURLToPath(new URL('../cli/main.js', import.meta.url));
const isRoot = process.getuid?.() === 0;

describe('WAN link cut for 5 s mid-transfer', { timeout: 240_000, skip: isRoot ? false : 'needs root for network namespaces' }, () => {
  let ws: Workspace;
  let link: ShapedLink;
  before(async () => {
    ws = await makeWorkspace(24 << 20, 24 << 20, 41);
    link = createShapedLink(10e6, `t${process.pid % 10000}`);
  });
  after(async () => {
    link?.destroy();
    await ws?.cleanup();
  });

  test('completes with identical images and reports the bytes sent twice', async () => {
    const outDir = join(ws.dir, 'destination', 'cut');
    const receiver = await spawnReceiverProcess({
      baseMemory: ws.destBaseMemory,
      baseDisk: ws.destBaseDisk,
      outDir,
      listen: `${link.destIp}:7300`,
      prefix: ['ip', 'netns', 'exec', link.destNs],
    });
    const timers: NodeJS.Timeout[] = [];
    try {
      const i = ws.images;
      const child = spawn(
        'ip',
        ['netns', 'exec', link.sourceNs, process.execPath, MAIN, 'migrate', '--base-memory', i.baseMemory, '--memory', i.memory, '--base-disk', i.baseDisk, '--disk', i.disk, '--to', receiver.address, '--mode', 'none', '--delta', 'none', '--json', '--no-progress'],
        { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, HANDOFF_LOG_LEVEL: 'warn' } },
      );
      let out = '';
      child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
      // raw pages: the transfer takes ~15 s at 10 Mbit/s: cut after 5 s (start-up included), for 5 s
      let cutAtMs = 0;
      timers.push(
        setTimeout(() => {
          cutAtMs = performance.now();
          link.setUp(false);
          timers.push(setTimeout(() => link.setUp(true), 5000));
        }, 5000),
      );
      const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
      const summary = JSON.parse(out) as MigrationSummary;
      assert.equal(code, 0, summary.reason);
      assert.equal(summary.verified, true, summary.reason);
      assert.ok(cutAtMs > 0, 'the link was not cut');
      assert.ok(summary.handoffSeconds > 10, `finished in ${summary.handoffSeconds} s: the cut came after the transfer`);
      const sender = summary.stages.sender!;
      assert.ok((sender.counts.reconnects ?? 0) >= 1, 'the sender did not reconnect');
      const resent = sender.counts.resentBytes ?? 0;
      process.stderr.write(`link cut for 5 s: ${resent} bytes sent twice (${((100 * resent) / summary.wireBytes).toFixed(1)}% of ${summary.wireBytes} on the wire), ${sender.counts.reconnects} reconnection(s), handoff ${summary.handoffSeconds.toFixed(1)} s\n`);
      const { result } = await receiver.exited;
      assert.equal(result?.result.verified, true);
      assert.equal(await hashImageFile(join(outDir, 'memory.img')), await hashImageFile(i.memory));
      assert.equal(await hashImageFile(join(outDir, 'disk.img')), await hashImageFile(i.disk));
    } finally {
      timers.forEach(clearTimeout);
      link.setUp(true);
      receiver.child.kill('SIGTERM');
      await receiver.exited;
    }
  });
});
