/**
 * QEMU's dirty bitmaps read through NBD on a real QEMU (the busybox guest, which writes random 4 KiB
 * blocks of its disk): a base records its bitmap; after the guest ran on, the bitmap's pages hold
 * every page that differs between the base's disk copy and the VM's disk, and are far fewer than
 * the disk's; the round bitmaps a handoff adds are removed again, the base's stays.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { open, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { GUEST_CACHE } from '../load/lib/vm.js';
import { PAGE_SIZE } from '../shared/image/pages.js';
import { buildGuest } from '../shared/testdata/guest.js';
import { readBase, type BaseFolder } from '../shared/vm/base-manifest.js';
import { takeBase } from '../shared/vm/base-snapshot.js';
import { DiskDirtyRounds, bitmapMissing, findDriveNode, pagesIn, readBitmapPages, type PageRun } from '../shared/vm/disk-dirty.js';
import { QEMU_BIN } from '../shared/vm/qemu.js';
import { startUserVm, userVmArgv, type UserVm } from './helpers/user-vm.js';

const hasQemu = spawnSync(QEMU_BIN, ['--version']).status === 0;
const DISK_BYTES = 64 << 20;

/** the pages where the two files differ */
async function differingPages(a: string, b: string): Promise<Set<number>> {
  const [fa, fb] = await Promise.all([open(a, 'r'), open(b, 'r')]);
  const block = 256 * PAGE_SIZE;
  const ba = Buffer.alloc(block);
  const bb = Buffer.alloc(block);
  const pages = new Set<number>();
  try {
    for (let offset = 0; offset < DISK_BYTES; offset += block) {
      await fa.read(ba, 0, block, offset);
      await fb.read(bb, 0, block, offset);
      for (let p = 0; p < block / PAGE_SIZE; p++) if (ba.compare(bb, p * PAGE_SIZE, (p + 1) * PAGE_SIZE, p * PAGE_SIZE, (p + 1) * PAGE_SIZE) !== 0) pages.add(offset / PAGE_SIZE + p);
    }
  } finally {
    await Promise.all([fa.close(), fb.close()]);
  }
  return pages;
}

function pageSet(runs: readonly PageRun[]): Set<number> {
  const s = new Set<number>();
  for (const r of runs) for (let p = r.first; p < r.first + r.pages; p++) s.add(p);
  return s;
}

describe('disk dirty bitmaps from a real QEMU', { timeout: 600_000, skip: hasQemu ? false : 'needs qemu-system-x86_64' }, () => {
  let dir: string;
  let vm: UserVm | undefined;
  let base: BaseFolder;
  let disk: string;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'disk-dirty-'));
    const guest = buildGuest(GUEST_CACHE);
    const paths = { qmp: join(dir, 'vm.qmp'), serial: join(dir, 'serial.log'), disk: join(dir, 'disk.raw') };
    disk = paths.disk;
    const fh = await open(disk, 'w');
    await fh.truncate(DISK_BYTES);
    await fh.close();
    vm = await startUserVm(userVmArgv(guest, paths), paths);
    await vm.waitCounter(3, 180_000);
    vm.disconnect();
    await takeBase({ qmpSocket: paths.qmp, outDir: join(dir, 'base') });
    base = await readBase(join(dir, 'base'));
  });

  after(async () => {
    await vm?.kill();
    await rm(dir, { recursive: true, force: true });
  });

  test("the base's bitmap holds every page written since, and far fewer than the disk's", async () => {
    const name = base.manifest.disks[0]!.dirtyBitmap;
    assert.match(name ?? '', /^handoff-base-[0-9a-f]{12}$/);
    const from = vm!.counter();
    await vm!.waitCounter(from + 8, 120_000);
    const qmp = await vm!.connect();
    try {
      const device = await findDriveNode(qmp, disk);
      assert.equal(bitmapMissing(device, name!, disk), undefined);
      const node = device!.inserted!['node-name']!;
      // the VM stopped: its writes are in the file, the bitmap final
      await qmp.execute('stop');
      const started = performance.now();
      const { rounds, pages } = await DiskDirtyRounds.start(qmp, node, name!, 0);
      const readMs = performance.now() - started;
      const differ = await differingPages(base.diskPaths[0]!, disk);
      const dirty = pageSet(pages);
      const missed = [...differ].filter((p) => !dirty.has(p));
      process.stderr.write(`bitmap: ${pagesIn(pages)} pages of ${DISK_BYTES / PAGE_SIZE} (${differ.size} differ from the base), read in ${readMs.toFixed(1)} ms\n`);
      assert.deepEqual(missed, [], 'pages that differ from the base are missing from the bitmap');
      assert.ok(differ.size > 0, 'the guest wrote to its disk');
      assert.ok(pagesIn(pages) < DISK_BYTES / PAGE_SIZE / 20, `the bitmap names ${pagesIn(pages)} pages of ${DISK_BYTES / PAGE_SIZE}`);
      // nothing is written while the VM is stopped: the round bitmap is empty
      assert.deepEqual(await rounds.finalPages(), []);
      await rounds.close();
      const left = (await findDriveNode(qmp, disk))!.inserted!['dirty-bitmaps']!.map((b) => b.name);
      assert.deepEqual(left, [name], 'only the base bitmap is left');
      // the base's bitmap itself cannot be exported while it records: QEMU's own error reaches the caller
      await assert.rejects(readBitmapPages(qmp, node, name!, 0), /bitmap|readonly/i);
      await qmp.execute('cont');
    } finally {
      vm!.disconnect();
    }
  });

  test('a bitmap QEMU does not have is named as missing', async () => {
    const qmp = await vm!.connect();
    try {
      assert.match(bitmapMissing(await findDriveNode(qmp, disk), 'handoff-base-000000000000', disk) ?? '', /no dirty bitmap handoff-base-000000000000/);
      assert.match(bitmapMissing(await findDriveNode(qmp, join(dir, 'other.raw')), 'x', 'other.raw') ?? '', /no block device/);
    } finally {
      vm!.disconnect();
    }
  });
});
