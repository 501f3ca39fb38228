/**
 * The check at the stop of a stream handoff (services/capture/ram-check.ts): which pages it
 * compares, how it finds QEMU's RAM in QEMU's own memory, and, on a real paused QEMU, that the
 * bytes it reads there are the guest's (QEMU's pmemsave of the same guest-physical page).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { GUEST_CACHE } from '../load/lib/vm.js';
import { blockOfRegion, checkResentPages, readResentPages, ResentPages, systemFlatRanges, writableBlockAddresses } from '../services/capture/ram-check.js';
import { FlatPages } from '../services/capture/stream-core.js';
import { PAGE_SIZE } from '../shared/image/pages.js';
import { buildGuest } from '../shared/testdata/guest.js';
import { QEMU_BIN } from '../shared/vm/qemu.js';
import { startUserVm, userVmArgv } from './helpers/user-vm.js';

const hasQemu = spawnSync(QEMU_BIN, ['--version']).status === 0;

/** `info mtree -f` of QEMU 7.2's pc machine with 1 GiB, cut to its first two views */
const MTREE = [
  'FlatView #0',
  ' AS "memory", root: system',
  ' AS "cpu-memory-0", root: system',
  ' Root memory region: system',
  '  0000000000000000-000000000009ffff (prio 0, ram): pc.ram',
  '  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem',
  '  00000000000c0000-00000000000cafff (prio 0, rom): pc.ram @00000000000c0000',
  '  0000000000100000-000000003fffffff (prio 0, ram): pc.ram @0000000000100000',
  '  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram',
  '  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios',
  '',
  'FlatView #1',
  ' AS "cpu-smm-0", root: memory',
  ' Root memory region: memory',
  '  0000000000000000-00000000000bffff (prio 0, ram): pc.ram',
].join('\r\n');

const page = (fill: number): Buffer => Buffer.alloc(PAGE_SIZE, fill);

describe('the pages checked at the stop', () => {
  test('only pages the stream carried more than once, against their last version there', () => {
    const resent = new ResentPages(8);
    resent.carried(1, page(1));
    resent.carried(2, page(2));
    resent.carried(2, page(3));
    resent.carried(2, page(4));
    assert.equal(resent.count, 1);
    assert.equal(resent.stale(1, page(9)), false, 'a page sent once cannot have lost a store');
    assert.equal(resent.stale(2, page(4)), false, 'the last version carried is not stale');
    assert.equal(resent.stale(2, page(3)), true, 'an earlier version is');
    assert.equal(resent.stale(2, page(5)), true);
  });

  test('read in spans from resent page to resent page, through short gaps, none longer than asked', () => {
    const resent = new ResentPages(40);
    for (const i of [0, 1, 2, 3, 4, 7, 11, 20, 30, 31, 39]) {
      resent.carried(i, page(0));
      resent.carried(i, page(1));
    }
    resent.carried(9, page(0));
    assert.deepEqual([...resent.spans(0, 40, 3, 100)], [[0, 12], [20, 1], [30, 2], [39, 1]], 'gaps of up to 3 pages read through');
    assert.deepEqual([...resent.spans(0, 40, 0, 100)], [[0, 5], [7, 1], [11, 1], [20, 1], [30, 2], [39, 1]], 'no gap: consecutive runs');
    assert.deepEqual([...resent.spans(0, 40, 3, 4)], [[0, 4], [4, 4], [11, 1], [20, 1], [30, 2], [39, 1]], 'none longer than 4');
    assert.deepEqual([...resent.spans(3, 31, 3, 100)], [[3, 9], [20, 1], [30, 1]], 'only within the range (a block)');
  });

  test("a flat page's block and offset are the inverse of its index", () => {
    const flat = new FlatPages([
      { idstr: 'pc.ram', offset: 0, bytes: 16 * PAGE_SIZE },
      { idstr: '0000:00:02.0/vga.vram', offset: 16 * PAGE_SIZE, bytes: 4 * PAGE_SIZE },
    ]);
    for (const [block, offset] of [['pc.ram', 0], ['pc.ram', 15 * PAGE_SIZE], ['0000:00:02.0/vga.vram', 2 * PAGE_SIZE]] as const) {
      assert.deepEqual(flat.locate(flat.index(block, offset)), { block, offset });
    }
    assert.throws(() => flat.locate(20), /no RAM block/);
  });
});

describe("QEMU's RAM in QEMU's own memory", () => {
  test("the system address space's ranges, with the region mapped and its offset", () => {
    const ranges = systemFlatRanges(MTREE);
    assert.equal(ranges.length, 6, 'the SMM view is not the system address space');
    assert.deepEqual(ranges[3], { start: 0x100000, end: 0x3fffffff, kind: 'ram', region: 'pc.ram', regionOffset: 0x100000 });
    assert.deepEqual(
      ranges.filter((r) => r.kind === 'ram').map((r) => r.region),
      ['pc.ram', 'pc.ram', 'vga.vram'],
    );
  });

  test("a region is the RAM block of its name, or of the one device's block ending in it", () => {
    const blocks = ['pc.ram', '0000:00:02.0/vga.vram', '0000:00:03.0/virtio-net-pci.rom'];
    assert.equal(blockOfRegion('pc.ram', blocks), 'pc.ram');
    assert.equal(blockOfRegion('vga.vram', blocks), '0000:00:02.0/vga.vram');
    assert.equal(blockOfRegion('vga.vram', [...blocks, '0000:00:04.0/vga.vram']), undefined, 'two VGAs: which one is not known');
    assert.equal(blockOfRegion('pc.bios', blocks), undefined);
  });

  test('on a paused QEMU, the bytes read at a RAM page are those QEMU saves of it; a stale one is sent, a current one not', { timeout: 180_000, skip: hasQemu ? false : `${QEMU_BIN} is not installed` }, async () => {
    const dir = await mkdtemp(join(tmpdir(), 'handoff-ram-check-'));
    const paths = { qmp: join(dir, 'qmp.sock'), serial: join(dir, 'serial.log') };
    const vm = await startUserVm(userVmArgv(buildGuest(GUEST_CACHE), paths, '128M'), paths);
    try {
      await vm.waitCounter(2, 120_000);
      const qmp = await vm.connect();
      await qmp.execute('stop');
      const blocks = [{ idstr: 'pc.ram', offset: 0, bytes: 128 << 20 }];
      const bases = await writableBlockAddresses(qmp, blocks.map((b) => b.idstr));
      assert.ok(bases.has('pc.ram'), `no host address for pc.ram: ${[...bases.keys()].join(', ')}`);
      // a page of the kernel's, where the guest has written (not zero)
      const guestPhysical = 0x1000000;
      const saved = join(dir, 'page.bin');
      await qmp.execute('pmemsave', { val: guestPhysical, size: 2 * PAGE_SIZE, filename: saved });
      const expected = await readFile(saved);
      const mem = await open(`/proc/${vm.child.pid}/mem`, 'r');
      const read = Buffer.alloc(2 * PAGE_SIZE);
      await mem.read(read, 0, read.byteLength, bases.get('pc.ram')! + guestPhysical);
      await mem.close();
      assert.ok(read.equals(expected), 'the bytes at the host address are not the guest page');
      assert.ok(!expected.equals(Buffer.alloc(expected.byteLength)), 'the page compared is all zero: it proves little');

      const flat = new FlatPages(blocks);
      const index = guestPhysical / PAGE_SIZE;
      const resent = new ResentPages(flat.pages);
      // page `index` carried twice, last as something else (stale); page `index + 1` last as it is
      resent.carried(index, expected.subarray(0, PAGE_SIZE));
      resent.carried(index, page(7));
      resent.carried(index + 1, page(7));
      resent.carried(index + 1, expected.subarray(PAGE_SIZE));
      const sent: [number, Buffer][] = [];
      const result = await checkResentPages(qmp, vm.child.pid!, flat, resent, async (i, p) => void sent.push([i, Buffer.from(p)]));
      assert.deepEqual({ ...result, addressMs: 0 }, { pagesChecked: 2, pagesStale: 1, reads: 1, addressMs: 0 }, 'two pages next to each other: one read');
      assert.deepEqual(sent.map(([i]) => i), [index]);
      assert.ok(sent[0]![1].equals(expected.subarray(0, PAGE_SIZE)), "the page sent is QEMU's, not the stream's");
      // the page sent is the version the destination holds now: a later check (as while the VM runs) finds nothing
      const again = await readResentPages(vm.child.pid!, flat, bases, resent, async (i) => assert.fail(`page ${i} sent twice`));
      assert.deepEqual({ checked: again.pagesChecked, stale: again.pagesStale }, { checked: 2, stale: 0 });
    } finally {
      await vm.kill();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
