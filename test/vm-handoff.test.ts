/**
 * A running QEMU guest (TCG without KVM) handed off live to a QEMU in another network namespace
 * behind a 10 Mbit/s shaped link: its counter goes on at the destination without a reboot, the
 * memory and disk at stop equal what was rebuilt, the source is left stopped. And when the
 * destination dies mid-handoff, the source VM runs again and says why. Needs root (namespaces).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { MigrationSummary } from '../cli/summary.js';
import { migrateOn } from '../load/lib/hosts.js';
import { liveMigrateArgs as migrateArgs, spawnVmDestination, startTestVm, type TestVm } from '../load/lib/vm.js';
import { createShapedLink, type ShapedLink } from '../load/lib/wan.js';
import { stopProcess } from '../shared/actor/child.js';
import { PAGE_SIZE, STRONG_HASH_BYTES, digestOfPageHashes, strongHash } from '../shared/image/pages.js';
import { lastCounter } from '../shared/vm/qemu.js';
import { QmpClient } from '../shared/vm/qmp.js';

const isRoot = process.getuid?.() === 0;

/** The image digest as the pipeline defines it, computed here independently from the file. */
function fileDigest(path: string): string {
  const data = readFileSync(path);
  const hashes = Buffer.alloc((data.byteLength / PAGE_SIZE) * STRONG_HASH_BYTES);
  for (let p = 0; p < data.byteLength / PAGE_SIZE; p++) strongHash(data.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)).copy(hashes, p * STRONG_HASH_BYTES);
  return digestOfPageHashes(hashes);
}

async function sourceStatus(vm: TestVm): Promise<string> {
  const qmp = await QmpClient.connect(vm.paths.qmpSocket, 5000);
  try {
    return (await qmp.execute('query-status')).status;
  } finally {
    qmp.close();
  }
}

describe('live handoff of a running QEMU VM', { timeout: 600_000, skip: isRoot ? false : 'needs root for network namespaces' }, () => {
  let dir: string;
  let link: ShapedLink;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'handoff-vm-'));
    link = createShapedLink(10e6, `vm${process.pid % 10000}`);
  });
  after(async () => {
    link?.destroy();
    // destination VMs are detached from the receivers that started them
    try {
      execFileSync('pkill', ['-f', dir]);
    } catch {
      // none left
    }
    await rm(dir, { recursive: true, force: true });
  });

  test('the guest runs on at the destination: counter continues, memory at stop rebuilt, source stopped', async () => {
    const vm = await startTestVm(join(dir, 'source'));
    const destDir = join(dir, 'destination');
    const receiver = await spawnVmDestination(vm, destDir, `${link.destIp}:7300`, ['ip', 'netns', 'exec', link.destNs]);
    try {
      // let the guest dirty memory and disk beyond its base for a while
      await vm.vm.waitCounter(vm.vm.counter() + 16);
      const summary: MigrationSummary = await migrateOn(['ip', 'netns', 'exec', link.sourceNs], migrateArgs(vm, receiver.address));
      process.stderr.write(`VM handoff: ${summary.handoffSeconds.toFixed(1)} s, downtime ${summary.downtimeMs} ms, ${summary.wireBytes} bytes on the wire, rounds ${JSON.stringify(summary.rounds)}\n`);
      assert.equal(summary.verified, true, summary.reason);
      assert.equal(summary.sourceVm, 'stopped');
      assert.ok(summary.downtimeMs !== undefined && summary.downtimeMs > 0);
      const { result } = await receiver.exited;
      assert.ok(result?.vm, 'the destination reported no running VM');
      // the source is stopped, so its files are what it was at the stop: the rebuilt images must match
      assert.notEqual(await sourceStatus(vm), 'running');
      const stoppedAt = vm.vm.counter();
      assert.equal(fileDigest(vm.paths.memoryFile), result.result.rebuiltHashes.memory, 'memory at stop differs from the rebuilt memory');
      assert.equal(fileDigest(vm.paths.disk), result.result.rebuiltHashes.disk, 'disk at stop differs from the rebuilt disk');
      // the destination's guest counts on from where the source stopped: no reboot
      const destSerial = result.vm.serialLog;
      const deadline = Date.now() + 60_000;
      while (lastCounter(destSerial) < stoppedAt + 5 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
      const firstAtDestination = Number(/handoff-counter (\d+)/.exec(readFileSync(destSerial, 'utf8'))?.[1] ?? 0);
      // the next one (or the one after, if the stop cut a line in half); a reboot would start at 1
      assert.ok(firstAtDestination === stoppedAt + 1 || firstAtDestination === stoppedAt + 2, `the destination's first counter is ${firstAtDestination}, the source stopped at ${stoppedAt}`);
      assert.ok(lastCounter(destSerial) >= stoppedAt + 5, 'the destination guest does not run on');
      assert.equal(vm.vm.counter(), stoppedAt, 'the source guest ran after the stop');
    } finally {
      await stopProcess(receiver.child, 5000);
      await vm.vm.kill();
    }
  });

  test('the destination dies mid-handoff: the source VM runs again, and says why', async () => {
    const vm = await startTestVm(join(dir, 'source-2'), { workingSetFiles: 128 });
    const destDir = join(dir, 'destination-2');
    const receiver = await spawnVmDestination(vm, destDir, `${link.destIp}:7301`, ['ip', 'netns', 'exec', link.destNs], true);
    try {
      await vm.vm.waitCounter(vm.vm.counter() + 16);
      // a slow link and one pre-copy round: the final round takes seconds, in which the destination
      // dies, once the source has stopped its VM (its counter stands still)
      link.setRate(3e6);
      let killed = false;
      const watcher = setInterval(() => {
        const c = vm.vm.counter();
        if (c === watched.counter && Date.now() - watched.since > 1500 && !killed) {
          killed = true;
          // the whole destination cloudlet: receiver, its nats-server (one process group) and its VM
          process.kill(-receiver.child.pid!, 'SIGKILL');
          try {
            execFileSync('pkill', ['-9', '-f', destDir]);
          } catch {
            // its VM had not started
          }
        } else if (c !== watched.counter) {
          watched.counter = c;
          watched.since = Date.now();
        }
      }, 100);
      const watched = { counter: vm.vm.counter(), since: Date.now() };
      const summary = await migrateOn(['ip', 'netns', 'exec', link.sourceNs], migrateArgs(vm, receiver.address, ['--link-deadline', '5', '--max-rounds', '1']));
      clearInterval(watcher);
      assert.ok(killed, 'the destination was not killed mid-handoff');
      assert.equal(summary.verified, false);
      assert.equal(summary.sourceVm, 'resumed');
      assert.match(summary.reason ?? '', /the source VM runs again/);
      assert.match(summary.reason ?? '', /link|destination/i);
      const resumedAt = vm.vm.counter();
      await vm.vm.waitCounter(resumedAt + 3, 30_000);
      assert.equal(await sourceStatus(vm), 'running');
    } finally {
      link.setRate(10e6);
      await stopProcess(receiver.child, 5000);
      await vm.vm.kill();
    }
  });
});
