/** QEMU's migration stream: records from any split, the writer's bytes, truncation and refusals by name. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MigrationStreamError, MigrationStreamParser, RamFlag, parseMigrationStream, type MigrationRecord } from '../../shared/vm/migration-stream.js';
import { MigrationStreamWriter, encodeMigrationStream } from '../../shared/vm/migration-stream-writer.js';

const PAGE = 4096;

function page(seed: number): Buffer {
  const b = Buffer.alloc(PAGE);
  for (let i = 0; i < PAGE; i++) b[i] = (seed * 31 + i * 7) & 0xff;
  return b;
}

function be32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

/** A device section as QEMU writes one: header, opaque body, footer. */
function fullSection(sectionId: number, idstr: string, body: Buffer): Buffer {
  return Buffer.concat([Buffer.from([0x04]), be32(sectionId), Buffer.from([idstr.length]), Buffer.from(idstr, 'latin1'), be32(0), be32(1), body, Buffer.from([0x7e]), be32(sectionId)]);
}

// a body holding what looks like its own footer, followed by a byte no section starts with
const trickyBody = Buffer.concat([Buffer.from('state'), Buffer.from([0x7e]), be32(5), Buffer.from([0x09, 0x7e, 0x00]), be32(5)]);

const records: MigrationRecord[] = [
  { kind: 'header', version: 3 },
  { kind: 'configuration', machineType: 'pc-i440fx-7.2', capabilities: ['x-ignore-shared'], uuid: Buffer.alloc(16, 0xab) },
  { kind: 'ram-section', phase: 'start', sectionId: 2, instanceId: 0, versionId: 4 },
  {
    kind: 'ram-blocks',
    totalBytes: 16 * PAGE + 2 * PAGE,
    blocks: [
      { idstr: 'pc.ram', lengthBytes: 16 * PAGE, address: 0 },
      { idstr: '0000:00:02.0/vga.vram', lengthBytes: 2 * PAGE, address: 0xfd000000 },
    ],
  },
  { kind: 'ram-eos', sectionId: 2 },
  { kind: 'ram-section', phase: 'part', sectionId: 2 },
  { kind: 'ram-page', block: 'pc.ram', offset: 0, data: page(1) },
  { kind: 'ram-zero', block: 'pc.ram', offset: PAGE, fill: 0 },
  { kind: 'ram-page', block: '0000:00:02.0/vga.vram', offset: PAGE, data: page(2) },
  { kind: 'ram-eos', sectionId: 2 },
  // CONTINUE across sections: the block of the previous section's last page
  { kind: 'ram-section', phase: 'end', sectionId: 2 },
  { kind: 'ram-zero', block: '0000:00:02.0/vga.vram', offset: 0, fill: 0 },
  { kind: 'ram-page', block: 'pc.ram', offset: 15 * PAGE, data: page(3) },
  { kind: 'ram-eos', sectionId: 2 },
  { kind: 'device-section', phase: 'full', sectionId: 5, idstr: 'timer', instanceId: 0, versionId: 1, bytes: fullSection(5, 'timer', trickyBody) },
  { kind: 'device-section', phase: 'full', sectionId: 7, idstr: '0000:00:03.0/virtio-net', instanceId: 0, versionId: 1, bytes: fullSection(7, '0000:00:03.0/virtio-net', Buffer.alloc(300, 0x7e)) },
  { kind: 'eof' },
  { kind: 'vm-description', json: '{"page_size":4096,"devices":[]}' },
];
const stream = encodeMigrationStream(records);

function parseAll(bytes: Buffer, chunkBytes = bytes.byteLength): MigrationRecord[] {
  const p = new MigrationStreamParser();
  const out: MigrationRecord[] = [];
  for (let i = 0; i < bytes.byteLength; i += chunkBytes) out.push(...p.push(bytes.subarray(i, i + chunkBytes)));
  out.push(...p.end());
  return out;
}

function ramWord(offset: number, flags: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(offset) | BigInt(flags));
  return b;
}

/** header, configuration, RAM START with one 1-page block "m", then `tail` inside that RAM section */
function ramStream(tail: Buffer[]): Buffer {
  const w = new MigrationStreamWriter();
  const head: MigrationRecord[] = [
    { kind: 'header', version: 3 },
    { kind: 'configuration', machineType: 'pc' },
    { kind: 'ram-section', phase: 'start', sectionId: 1, instanceId: 0, versionId: 4 },
    { kind: 'ram-blocks', totalBytes: PAGE, blocks: [{ idstr: 'm', lengthBytes: PAGE }] },
  ];
  return Buffer.concat([...head.map((r) => w.encode(r)), ...tail]);
}

function errorOf(bytes: Buffer): MigrationStreamError {
  try {
    parseAll(bytes);
  } catch (err) {
    assert.ok(err instanceof MigrationStreamError, `not a MigrationStreamError: ${String(err)}`);
    return err;
  }
  assert.fail('the stream was accepted');
}

describe('migration stream', () => {
  test('round trip: the records read back equal those written, and rewriting gives the same bytes', () => {
    const back = parseAll(stream);
    assert.deepEqual(back, records);
    assert.deepEqual(encodeMigrationStream(back), stream);
  });

  test('the same records whatever the split: one byte, 7 bytes, 4 KiB at a time', () => {
    for (const size of [1, 7, 4096]) assert.deepEqual(parseAll(stream, size), records, `chunks of ${size}`);
  });

  test('from an async source of chunks', async () => {
    async function* chunks(): AsyncGenerator<Buffer> {
      for (let i = 0; i < stream.byteLength; i += 1000) yield stream.subarray(i, i + 1000);
    }
    const got: MigrationRecord[] = [];
    for await (const r of parseMigrationStream(chunks())) got.push(r);
    assert.deepEqual(got, records);
  });

  test('the layout QEMU writes, spelled out by hand', () => {
    const hand = Buffer.concat([
      Buffer.from('QEVM', 'latin1'),
      be32(3),
      Buffer.from([0x07]),
      be32(2),
      Buffer.from('pc'),
      Buffer.from([0x01]),
      be32(2),
      Buffer.from([3]),
      Buffer.from('ram'),
      be32(0),
      be32(4),
      ramWord(PAGE, RamFlag.MEM_SIZE),
      Buffer.from([6]),
      Buffer.from('pc.ram'),
      ramWord(PAGE, 0),
      ramWord(0, RamFlag.ZERO),
      Buffer.from([6]),
      Buffer.from('pc.ram'),
      Buffer.from([0]),
      ramWord(0, RamFlag.PAGE | RamFlag.CONTINUE),
      page(9),
      ramWord(0, RamFlag.EOS),
      Buffer.from([0x7e]),
      be32(2),
      Buffer.from([0x03]),
      be32(2),
      ramWord(0, RamFlag.EOS),
      Buffer.from([0x7e]),
      be32(2),
      Buffer.from([0x00]),
    ]);
    const expected: MigrationRecord[] = [
      { kind: 'header', version: 3 },
      { kind: 'configuration', machineType: 'pc' },
      { kind: 'ram-section', phase: 'start', sectionId: 2, instanceId: 0, versionId: 4 },
      { kind: 'ram-blocks', totalBytes: PAGE, blocks: [{ idstr: 'pc.ram', lengthBytes: PAGE }] },
      { kind: 'ram-zero', block: 'pc.ram', offset: 0, fill: 0 },
      { kind: 'ram-page', block: 'pc.ram', offset: 0, data: page(9) },
      { kind: 'ram-eos', sectionId: 2 },
      { kind: 'ram-section', phase: 'end', sectionId: 2 },
      { kind: 'ram-eos', sectionId: 2 },
      { kind: 'eof' },
    ];
    assert.deepEqual(parseAll(hand), expected);
    assert.deepEqual(encodeMigrationStream(expected), hand);
  });

  test('truncated at every byte: only whole records come out, then a truncation error or, after EOF, the end', () => {
    const eofIndex = records.findIndex((r) => r.kind === 'eof');
    for (let cut = 0; cut < stream.byteLength; cut++) {
      const p = new MigrationStreamParser();
      const got = p.push(stream.subarray(0, cut));
      assert.deepEqual(got, records.slice(0, got.length), `a wrong record from the first ${cut} bytes`);
      let ended: MigrationRecord[];
      try {
        ended = p.end();
      } catch (err) {
        assert.ok(err instanceof MigrationStreamError, `cut at ${cut}: ${String(err)}`);
        assert.equal(err.kind, 'truncated', `cut at ${cut}: ${err.message}`);
        assert.ok(err.offset <= cut, `cut at ${cut}: the error names byte ${err.offset}`);
        assert.match(err.message, /expected .+/);
        continue;
      }
      // the VM description is optional: a stream may end right after EOF
      assert.deepEqual([...got, ...ended], records.slice(0, eofIndex + 1), `cut at ${cut} accepted`);
    }
  });

  test('split at every byte into two pushes gives all the records', () => {
    for (let cut = 0; cut <= stream.byteLength; cut++) {
      const p = new MigrationStreamParser();
      assert.deepEqual([...p.push(stream.subarray(0, cut)), ...p.push(stream.subarray(cut)), ...p.end()], records, `split at ${cut}`);
    }
  });

  test('RAM flags the reader does not follow are refused by name', () => {
    const cases: [number, RegExp][] = [
      [RamFlag.XBZRLE, /RAM_SAVE_FLAG_XBZRLE/],
      [RamFlag.COMPRESS_PAGE, /RAM_SAVE_FLAG_COMPRESS_PAGE/],
      [RamFlag.HOOK, /RAM_SAVE_FLAG_HOOK/],
      [RamFlag.FULL, /RAM_SAVE_FLAG_FULL/],
      [0x200, /unknown flag bits 0x200/],
      [RamFlag.ZERO | RamFlag.PAGE, /combination 0x0a/],
    ];
    const at = ramStream([]).byteLength;
    for (const [flags, message] of cases) {
      const err = errorOf(ramStream([ramWord(0, flags), Buffer.from([1]), Buffer.from('m'), Buffer.alloc(PAGE)]));
      assert.match(err.message, message);
      assert.equal(err.offset, at);
      assert.notEqual(err.kind, 'truncated');
    }
  });

  test('malformed streams are refused naming the byte and what was expected', () => {
    const bad = Buffer.from(stream);
    bad.write('QEVN', 0, 'latin1');
    assert.match(errorOf(bad).message, /byte 0: expected the magic QEVM/);
    const v2 = Buffer.from(stream);
    v2.writeUInt32BE(2, 4);
    assert.match(errorOf(v2).message, /byte 4: expected the stream version 3, found 2/);
    assert.match(errorOf(ramStream([ramWord(0, RamFlag.PAGE | RamFlag.CONTINUE), Buffer.alloc(PAGE)])).message, /CONTINUE before any block/);
    assert.match(errorOf(ramStream([ramWord(PAGE, RamFlag.ZERO), Buffer.from([1]), Buffer.from('m'), Buffer.from([0])])).message, /an offset inside RAM block "m" \(4096 bytes\), found 4096/);
    assert.match(errorOf(ramStream([ramWord(0, RamFlag.ZERO), Buffer.from([1]), Buffer.from('x'), Buffer.from([0])])).message, /announced by MEM_SIZE, found "x"/);
    assert.match(errorOf(ramStream([ramWord(0, RamFlag.EOS), Buffer.from([0x7e]), be32(9)])).message, /footer of RAM section 1, found section id 9/);
    assert.match(errorOf(ramStream([ramWord(0, RamFlag.EOS), Buffer.from([0x7e]), be32(1), Buffer.from([0x02]), be32(4)])).message, /opened by START, found 4/);
    const postcopy = ramStream([ramWord(0, RamFlag.EOS), Buffer.from([0x7e]), be32(1), Buffer.from([0x08, 0x00, 0x03, 0x00, 0x00])]);
    assert.match(errorOf(postcopy).message, /MIG_CMD_POSTCOPY_ADVISE/);
    assert.match(errorOf(Buffer.concat([stream, Buffer.from([0])])).message, /the end of the stream after the VM description, found 1 more bytes/);
    const overBlocks = new MigrationStreamWriter().encode({ kind: 'ram-blocks', totalBytes: PAGE, blocks: [{ idstr: 'm', lengthBytes: 2 * PAGE }] });
    const headOnly = ramStream([]).subarray(0, ramStream([]).byteLength - (8 + 2 + 8));
    assert.match(errorOf(Buffer.concat([headOnly, overBlocks])).message, /adding up to the MEM_SIZE total 4096/);
  });

  test('a device section without its footer is truncated, not cut short at a look-alike', () => {
    const w = new MigrationStreamWriter();
    const head = Buffer.concat([w.encode({ kind: 'header', version: 3 }), w.encode({ kind: 'configuration', machineType: 'pc' })]);
    const section = fullSection(5, 'timer', trickyBody);
    const err = errorOf(Buffer.concat([head, section.subarray(0, section.byteLength - 5)]));
    assert.equal(err.kind, 'truncated');
    assert.match(err.message, /the footer of section 5 \("timer"\)/);
  });
});
