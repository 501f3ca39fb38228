/**
 * Stream capture's pure parts on synthetic data: the block list checked against the base's (naming
 * the difference), pages placed in the flat memory image, rounds cut on a repeated page, pages
 * compared with the version the destination holds, and the summary of QEMU's throttling.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { qemuSummary } from '../../cli/summary.js';
import { FlatPages, PageReference, RoundCutter, decideStreamStop, nextCpuQuotaPct, pagesLeftAtCut, ramBlockDifferences, recentPace, type StreamRoundRecord, type StreamStopInput } from '../../services/capture/stream-core.js';
import { PAGE_SIZE, STRONG_HASH_BYTES, ZERO_PAGE, digestOfPageHashes, strongHash } from '../../shared/image/pages.js';
import { encodeMigrationStream } from '../../shared/vm/migration-stream-writer.js';
import { MigrationStreamParser, type MigrationRecord } from '../../shared/vm/migration-stream.js';
import { ramLayout } from '../../shared/vm/ram-image.js';

const MiB = 1 << 20;
const blocks = [
  { idstr: 'pc.ram', lengthBytes: 4 * MiB },
  { idstr: 'vga.vram', lengthBytes: MiB },
  { idstr: '/rom@etc/acpi/tables', lengthBytes: 6000 },
];
const layout = ramLayout(blocks);

function page(fill: number, tag = 0): Buffer {
  const p = Buffer.alloc(PAGE_SIZE, fill);
  p.writeUInt32LE(tag, 0);
  return p;
}

describe('block list against the base', () => {
  test('the same blocks: no difference', () => {
    assert.deepEqual(ramBlockDifferences(blocks, layout.blocks), []);
  });

  test('another size, a block missing or extra, another order: each named', () => {
    const bigger = ramBlockDifferences([{ idstr: 'pc.ram', lengthBytes: 8 * MiB }, ...blocks.slice(1)], layout.blocks);
    assert.deepEqual(bigger, ['RAM block "pc.ram": 8.00 MiB in the VM, 4.00 MiB in the base']);
    const noVga = ramBlockDifferences([blocks[0]!, blocks[2]!], layout.blocks);
    assert.equal(noVga.length, 1);
    assert.match(noVga[0]!, /"vga\.vram" \(1\.00 MiB\) is in the base, not in the VM/);
    const extra = ramBlockDifferences([...blocks, { idstr: 'virtio-vga.vram', lengthBytes: MiB }], layout.blocks);
    assert.match(extra.join(), /"virtio-vga\.vram" \(1\.00 MiB\) is in the VM, not in the base/);
    const order = ramBlockDifferences([blocks[1]!, blocks[0]!, blocks[2]!], layout.blocks);
    assert.match(order.join(), /another order: vga\.vram, pc\.ram/);
  });
});

describe('flat page index', () => {
  test("a block's pages start at its offset in the base's memory image", () => {
    const flat = new FlatPages(layout.blocks);
    assert.equal(flat.pages * PAGE_SIZE, layout.bytes);
    assert.equal(flat.index('pc.ram', 0), 0);
    assert.equal(flat.index('vga.vram', PAGE_SIZE), (4 * MiB) / PAGE_SIZE + 1);
    // the last block is 6000 bytes: two pages, the second partly beyond its end
    assert.equal(flat.index('/rom@etc/acpi/tables', PAGE_SIZE), (5 * MiB) / PAGE_SIZE + 1);
    assert.throws(() => flat.index('/rom@etc/acpi/tables', 2 * PAGE_SIZE), /outside it/);
    assert.throws(() => flat.index('pc.bios', 0), /the base does not have/);
  });
});

describe('round cut on a repeated page', () => {
  test('a page seen twice ends the round before it; the next round starts with it', () => {
    const cutter = new RoundCutter(16);
    const rounds: number[][] = [[]];
    for (const index of [0, 1, 2, 3, 4, 5, 2, 7, 8, 7, 2]) {
      if (cutter.repeats(index)) {
        cutter.next();
        rounds.push([]);
      }
      cutter.see(index);
      rounds.at(-1)!.push(index);
    }
    assert.deepEqual(rounds, [[0, 1, 2, 3, 4, 5], [2, 7, 8], [7, 2]]);
    assert.equal(cutter.round, 2);
    assert.equal(cutter.pagesSeen, 2);
  });
});

describe('page reference', () => {
  test('round 0 compares with the base, later rounds with the version last sent', () => {
    const base = [page(1), page(2), ZERO_PAGE, page(4)];
    const hashes = Buffer.concat(base.map((p) => strongHash(p)));
    const ref = new PageReference(hashes);
    assert.equal(ref.digest(), digestOfPageHashes(hashes));
    // round 0: the base's page 0 and zero page 2 are unchanged; page 1 changed
    assert.equal(ref.changed(0, page(1)), undefined);
    assert.equal(ref.changed(2, PageReference.filled(0).page, PageReference.filled(0).hash), undefined);
    const sent = ref.changed(1, page(2, 7));
    assert.ok(sent);
    assert.equal(sent.index, 1);
    assert.deepEqual(sent.hash, strongHash(page(2, 7)));
    // the same version again is not sent; back to the base's version is (the destination holds the new one)
    assert.equal(ref.changed(1, page(2, 7)), undefined);
    assert.ok(ref.changed(1, page(2)));
    // a fill-byte zero record
    const filled = PageReference.filled(4);
    assert.ok(ref.changed(3, filled.page, filled.hash), 'a page of 0x04 bytes differs from the base page 4');
    // the digest follows what the destination holds now
    const now = Buffer.concat([page(1), page(2), ZERO_PAGE, Buffer.alloc(PAGE_SIZE, 4)].map((p) => strongHash(p)));
    assert.equal(ref.digest(), digestOfPageHashes(now));
    assert.throws(() => ref.changed(4, page(9)), /outside the memory image/);
    assert.equal(ref.strong.byteLength, 4 * STRONG_HASH_BYTES);
  });
});

describe('a synthetic stream through the pure parts', () => {
  test('round 0 sends only what differs from the base; QEMU\'s next pass becomes round 1', () => {
    const small = ramLayout([{ idstr: 'pc.ram', lengthBytes: 8 * PAGE_SIZE }]);
    const basePages = Array.from({ length: 8 }, (_, i) => (i % 3 === 0 ? ZERO_PAGE : page(i)));
    const ref = new PageReference(Buffer.concat(basePages.map((p) => strongHash(p))));
    const pageRecord = (i: number, data: Buffer): MigrationRecord => ({ kind: 'ram-page', block: 'pc.ram', offset: i * PAGE_SIZE, data });
    const zero = (i: number): MigrationRecord => ({ kind: 'ram-zero', block: 'pc.ram', offset: i * PAGE_SIZE, fill: 0 });
    const records: MigrationRecord[] = [
      { kind: 'header', version: 3 },
      { kind: 'configuration', machineType: 'pc-i440fx-7.2' },
      { kind: 'ram-section', phase: 'start', sectionId: 2, instanceId: 0, versionId: 4 },
      { kind: 'ram-blocks', totalBytes: 8 * PAGE_SIZE, blocks: [{ idstr: 'pc.ram', lengthBytes: 8 * PAGE_SIZE }] },
      { kind: 'ram-eos', sectionId: 2 },
      { kind: 'ram-section', phase: 'part', sectionId: 2 },
      // the first pass: every page; 4 and 5 changed since the base, 3 is no longer zero
      ...basePages.map((p, i) => (i === 4 || i === 5 ? pageRecord(i, page(i, 1)) : i === 3 ? pageRecord(i, page(9)) : i % 3 === 0 ? zero(i) : pageRecord(i, p))),
      // the next pass: 5 again (changed again), 7 (unchanged since it was sent)
      pageRecord(5, page(5, 2)),
      pageRecord(7, basePages[7]!),
      { kind: 'ram-eos', sectionId: 2 },
    ];
    const parser = new MigrationStreamParser();
    const parsed = parser.push(encodeMigrationStream(records));
    const flat = new FlatPages(small.blocks);
    const cutter = new RoundCutter(flat.pages);
    const sent: number[][] = [[]];
    for (const r of parsed) {
      if (r.kind === 'ram-blocks') assert.deepEqual(ramBlockDifferences(r.blocks, small.blocks), []);
      if (r.kind !== 'ram-page' && r.kind !== 'ram-zero') continue;
      const index = flat.index(r.block, r.offset);
      if (cutter.repeats(index)) {
        cutter.next();
        sent.push([]);
      }
      cutter.see(index);
      const data = r.kind === 'ram-page' ? r.data : PageReference.filled(r.fill).page;
      if (ref.changed(index, data)) sent.at(-1)!.push(index);
    }
    assert.deepEqual(sent, [[3, 4, 5], [5]]);
  });
});

describe('QEMU in the summary', () => {
  test('its downtime from the last round, the most throttle and the throttled rounds', () => {
    const rounds: StreamRoundRecord[] = [
      { round: 0, dirtyPages: 900, seconds: 3, decision: '', cpuThrottlePct: 0 },
      { round: 1, dirtyPages: 700, seconds: 1, decision: '', cpuThrottlePct: 20 },
      { round: 2, dirtyPages: 90, seconds: 0.2, decision: 'stop-and-copy', cpuThrottlePct: 30, qemuDowntimeMs: 41 },
    ];
    assert.deepEqual(qemuSummary(rounds, true), { autoConverge: true, downtimeMs: 41, maxCpuThrottlePct: 30, throttledRounds: 2 });
    assert.deepEqual(qemuSummary([], false), { autoConverge: false, maxCpuThrottlePct: 0, throttledRounds: 0 });
  });
});

describe('stream capture: slowing the guest', () => {
  test('its CPU quota halves at each round, down to a floor', () => {
    const steps: number[] = [];
    for (let pct: number | undefined = 100; (pct = nextCpuQuotaPct(pct)) !== undefined; ) steps.push(pct);
    assert.deepEqual(steps, [50, 25, 12, 6]);
  });
});

describe('stream capture: when QEMU is to stop the VM', () => {
  const at = (o: Partial<StreamStopInput>): StreamStopInput => ({ remainingPages: 100, dirtyPagesPerSec: 50, deliveredPagesPerSec: 1000, changedShare: 1, roundsDone: 2, maxRounds: 30, downtimeMs: 300, overheadMs: 150, canSlow: true, ...o });
  test("stops when QEMU's remaining pages cross within the target at the delivered pace", () => {
    const d = decideStreamStop(at({ remainingPages: 100 }));
    assert.equal(d.action, 'stop');
    assert.equal(Math.round(d.predictedDowntimeMs), 250);
  });
  test('goes on while converging, slows a guest that dirties as fast as pages are delivered, stops at the floor or the round limit', () => {
    assert.equal(decideStreamStop(at({ remainingPages: 9000, dirtyPagesPerSec: 200 })).action, 'continue');
    assert.equal(decideStreamStop(at({ remainingPages: 9000, dirtyPagesPerSec: 2000 })).action, 'slow');
    assert.equal(decideStreamStop(at({ remainingPages: 9000, dirtyPagesPerSec: 2000, canSlow: false })).action, 'stop');
    assert.equal(decideStreamStop(at({ remainingPages: 9000, dirtyPagesPerSec: 200, roundsDone: 30 })).action, 'stop');
    assert.equal(decideStreamStop(at({ remainingPages: 1, deliveredPagesPerSec: 0 })).predictedDowntimeMs, Infinity, 'nothing delivered yet: no stop on a guess');
  });
  test("QEMU's figures count pages rewritten with the same bytes: scaled by the share found changed", () => {
    assert.equal(decideStreamStop(at({ remainingPages: 400 })).action, 'continue', '400 pages take 400 ms');
    const scaled = decideStreamStop(at({ remainingPages: 400, changedShare: 0.25 }));
    assert.equal(scaled.action, 'stop', 'of which 100 changed: 100 ms');
    assert.equal(Math.round(scaled.predictedDowntimeMs), 250);
    assert.equal(decideStreamStop(at({ remainingPages: 9000, dirtyPagesPerSec: 2000 })).action, 'slow');
    assert.equal(decideStreamStop(at({ remainingPages: 9000, dirtyPagesPerSec: 2000, changedShare: 0.25 })).action, 'continue', '500 changed pages/s dirtied, 1000 delivered: converging');
  });
  test("the pages left at a cut: QEMU's last report, or what the guest dirtied while the round ran, whichever is more", () => {
    assert.equal(pagesLeftAtCut(657, 4000, 0.5, 1.58), 6320, 'a report from before the sync misses the pass just begun');
    assert.equal(pagesLeftAtCut(9000, 4000, 0.5, 0.1), 11000, 'a long pass still under way: the report, and what was dirtied since it');
    assert.equal(pagesLeftAtCut(0, 0, 0.5, 2), 0);
  });
  test('the pace and the changed share come from the last rounds, after round 0', () => {
    const round0 = { dirtyPages: 60_000, pagesSeen: 260_000, seconds: 18 };
    assert.deepEqual(recentPace([round0]), { deliveredPagesPerSec: 60_000 / 18, changedShare: 60_000 / 260_000 }, 'round 0 alone: its own');
    const later = [
      { dirtyPages: 3000, pagesSeen: 6000, seconds: 2 },
      { dirtyPages: 300, pagesSeen: 1000, seconds: 0.25 },
      { dirtyPages: 200, pagesSeen: 1000, seconds: 0.25 },
    ];
    assert.deepEqual(recentPace([round0, ...later]), { deliveredPagesPerSec: 3500 / 2.5, changedShare: 3500 / 8000 }, 'back to about 2 s of rounds');
    assert.deepEqual(recentPace([round0, ...later, { dirtyPages: 500, pagesSeen: 1000, seconds: 1.6 }]), { deliveredPagesPerSec: 1000 / 2.1, changedShare: 1000 / 3000 }, 'the older rounds drop out');
    assert.deepEqual(recentPace([]), { deliveredPagesPerSec: 0, changedShare: 1 });
  });
});
