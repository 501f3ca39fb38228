/**
 * A VM started the way its owner starts one (ordinary RAM, QEMU's default devices, a virtio NIC, a
 * raw disk) handed off with the commands a user runs: `handoff base` at the source, the base folder
 * copied to the destination, `receive --base --resume-vm` there and `migrate --qmp --base` here,
 * over a 10 Mbit/s shaped link between two network namespaces. And a destination whose machine
 * differs is refused before any page moves, naming the difference, while the source runs on.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { spawnReceiverProcess, type ReceiverProcess } from '../cli/receive.js';
import { GUEST_CACHE } from '../load/lib/vm.js';
import { migrateOn } from '../load/lib/hosts.js';
import { createShapedLink, type ShapedLink } from '../load/lib/wan.js';
import { stopProcess } from '../shared/actor/child.js';
import { imageDigest } from '../shared/image/base-index.js';
import { buildGuest, type GuestFiles } from '../shared/testdata/guest.js';
import { lastCounter } from '../shared/vm/qemu.js';
import { readBase } from '../shared/vm/base-manifest.js';
import { takeBase } from '../shared/vm/base-snapshot.js';
import { imageMemoryHash, qemuMemoryHash } from './helpers/guest-memory.js';
import { startUserVm, userVmArgv, type UserVm } from './helpers/user-vm.js';

const isRoot = process.getuid?.() === 0;
/** userVmArgv's default -m */
const GUEST_RAM_BYTES = 256 << 20;

describe('handoff of a VM started the ordinary way', { timeout: 900_000, skip: isRoot ? false : 'needs root for network namespaces' }, () => {
  let dir: string;
  let link: ShapedLink;
  let guest: GuestFiles;
  /** the first test's handoff: the source's RAM at stop and the rebuilt RAM, hashed */
  let ramAtStop: { source: string; rebuilt: string } | undefined;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'handoff-user-vm-'));
    link = createShapedLink(10e6, `uv${process.pid % 10000}`);
    guest = buildGuest(GUEST_CACHE);
  });
  after(async () => {
    link?.destroy();
    // destination VMs outlive the receivers that started them
    try {
      execFileSync('pkill', ['-f', dir]);
    } catch {
      // none left
    }
    await rm(dir, { recursive: true, force: true });
  });

  /** The source VM in the source namespace, running; its base taken and copied to `destinationBase`. */
  async function sourceWithBase(name: string, destinationBase: string): Promise<{ vm: UserVm; base: string }> {
    const src = join(dir, name);
    execFileSync('mkdir', ['-p', src]);
    const paths = { qmp: join(src, 'qmp.sock'), serial: join(src, 'serial.log'), disk: join(src, 'disk.img') };
    writeFileSync(paths.disk, '');
    truncateSync(paths.disk, 32 << 20);
    const vm = await startUserVm(['ip', 'netns', 'exec', link.sourceNs, ...userVmArgv(guest, paths)], paths);
    try {
      await vm.waitCounter(3, 120_000);
      // QEMU serves one QMP client: the base, then the handoff, take it in turn
      vm.disconnect();
      const base = join(src, 'base');
      await takeBase({ qmpSocket: paths.qmp, outDir: base });
      execFileSync('cp', ['-a', '--sparse=always', base, destinationBase]);
      return { vm, base };
    } catch (err) {
      await vm.kill();
      throw err;
    }
  }

  function receiverFor(name: string, base: string, port: number, qemuCommand?: string): Promise<ReceiverProcess> {
    return spawnReceiverProcess({
      base,
      outDir: join(dir, name, 'out'),
      listen: `${link.destIp}:${port}`,
      prefix: ['ip', 'netns', 'exec', link.destNs],
      stream: qemuCommand ? { qemuCommand } : {},
      forwardLogs: process.env.HANDOFF_LOG_LEVEL === 'info' || process.env.HANDOFF_LOG_LEVEL === 'debug',
    });
  }

  test('the guest runs on at the destination: verified, disk at stop rebuilt, counter continues, source stopped', async () => {
    execFileSync('mkdir', ['-p', join(dir, 'dst')]);
    const { vm, base } = await sourceWithBase('src', join(dir, 'dst', 'base'));
    const receiver = await receiverFor('dst', join(dir, 'dst', 'base'), 7300);
    try {
      await vm.waitCounter(vm.counter() + 16, 120_000);
      const summary = await migrateOn(['ip', 'netns', 'exec', link.sourceNs], ['--qmp', vm.paths.qmp, '--base', base, '--to', receiver.address]);
      process.stderr.write(`user VM handoff: ${summary.handoffSeconds.toFixed(1)} s, downtime ${summary.downtimeMs} ms, ${summary.wireBytes} bytes on the wire\n`);
      assert.equal(summary.verified, true, summary.reason);
      assert.equal(summary.sourceVm, 'stopped');
      assert.ok(summary.downtimeMs !== undefined && summary.downtimeMs > 0);
      const { result } = await receiver.exited;
      assert.ok(result?.vm, `the destination reported no running VM: ${receiver.logTail()}`);
      const stoppedAt = vm.counter();
      // the source's RAM as it stopped (it stays paused) against the RAM image rebuilt at the
      // destination, which is what its QEMU was fed before its `cont`: checked in its own test below
      ramAtStop = { source: await qemuMemoryHash(await vm.connect(), join(dir, 'src'), GUEST_RAM_BYTES), rebuilt: await imageMemoryHash({ ...(await readBase(base)), memoryPath: result.memoryPath }, GUEST_RAM_BYTES) };
      assert.equal(await imageDigest(vm.paths.disk!), result.result.rebuiltHashes.disk, 'the disk at stop differs from the rebuilt disk');
      // the destination's guest counts on from where the source stopped: no reboot
      const destSerial = result.vm.serialLog;
      const deadline = Date.now() + 60_000;
      while (lastCounter(destSerial) < stoppedAt + 5 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
      const first = Number(/handoff-counter (\d+)/.exec(readFileSync(destSerial, 'utf8'))?.[1] ?? 0);
      assert.ok(first === stoppedAt + 1 || first === stoppedAt + 2, `the destination's first counter is ${first}, the source stopped at ${stoppedAt}`);
      assert.ok(lastCounter(destSerial) >= stoppedAt + 5, 'the destination guest does not run on');
      assert.equal(vm.counter(), stoppedAt, 'the source guest ran after the stop');
      const status = (await vm.connect()).execute('query-status').then((s) => s.status);
      assert.notEqual(await status, 'running');
    } finally {
      await stopProcess(receiver.child, 5000);
      await vm.kill();
    }
  });

  // QEMU 7.2 under TCG loses some stores from its dirty log (see services/capture/ram-check.ts):
  // without the RAM check at the stop, about a third of runs here differed in one to four pages
  test("the source's RAM at stop is the RAM rebuilt at the destination", () => {
    assert.ok(ramAtStop, 'the handoff above did not run');
    assert.equal(ramAtStop.rebuilt, ramAtStop.source, 'the RAM at stop differs from the rebuilt RAM');
  });

  test('a destination whose machine differs is refused before any page moves, naming the difference; the source runs on', async () => {
    execFileSync('mkdir', ['-p', join(dir, 'dst-2')]);
    const { vm, base } = await sourceWithBase('src-2', join(dir, 'dst-2', 'base'));
    try {
      const own = userVmArgv(guest, { qmp: join(dir, 'dst-2', 'qmp.sock'), serial: join(dir, 'dst-2', 'serial.log'), disk: join(dir, 'dst-2', 'disk.img') });
      const cases: [string, string[], RegExp][] = [
        ['another RAM size', own.map((a) => (a === '256M' ? '512M' : a)), /memory.*256 MiB.*512 MiB/],
        ['no NIC', own.filter((a, i) => a !== '-nic' && own[i - 1] !== '-nic'), /virtio-net-pci/],
      ];
      for (const [i, [what, argv, reason]] of cases.entries()) {
        const receiver = await receiverFor('dst-2', join(dir, 'dst-2', 'base'), 7310 + i, argv.map((a) => (/[\s'"]/.test(a) ? `'${a}'` : a)).join(' '));
        try {
          const before = vm.counter();
          const summary = await migrateOn(['ip', 'netns', 'exec', link.sourceNs], ['--qmp', vm.paths.qmp, '--base', base, '--to', receiver.address]);
          assert.equal(summary.verified, false, what);
          assert.match(summary.reason ?? '', reason, what);
          assert.equal(summary.inputBytes, 0, `${what}: pages were captured before the refusal`);
          await vm.waitCounter(before + 3, 30_000);
        } finally {
          await stopProcess(receiver.child, 5000);
        }
      }
    } finally {
      await vm.kill();
    }
  });
});
