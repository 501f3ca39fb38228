/**
 * QEMU 7.2's migration stream, read incrementally: fed Buffers as they arrive from the socket QEMU
 * migrates to, it yields typed records (the machine type, the RAM block list, RAM pages and zero
 * pages, RAM section ends) and passes every other device's section through as opaque bytes. Only
 * the record being read is held, never the stream. The layout follows QEMU's migration/savevm.c
 * (sections, footers, configuration) and migration/ram.c (ram_save_setup, ram_load_precopy), with
 * multifd, XBZRLE, compression and postcopy off so that all of RAM travels in the main stream.
 */

export const QEMU_VM_FILE_MAGIC = 0x5145564d;
export const QEMU_VM_FILE_VERSION = 3;

/** Section and marker bytes of savevm.c. */
export const SectionType = {
  EOF: 0x00,
  START: 0x01,
  PART: 0x02,
  END: 0x03,
  FULL: 0x04,
  SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06,
  CONFIGURATION: 0x07,
  COMMAND: 0x08,
  FOOTER: 0x7e,
} as const;

/** The low bits of a RAM record's be64 `offset | flags` (ram.c). */
export const RamFlag = {
  FULL: 0x01,
  ZERO: 0x02,
  MEM_SIZE: 0x04,
  PAGE: 0x08,
  EOS: 0x10,
  CONTINUE: 0x20,
  XBZRLE: 0x40,
  HOOK: 0x80,
  COMPRESS_PAGE: 0x100,
} as const;

/** Flags QEMU 7.2 knows but this reader refuses, with why: their pages would not be plain bytes. */
const REFUSED_RAM_FLAGS: readonly [number, string][] = [
  [RamFlag.FULL, 'RAM_SAVE_FLAG_FULL (obsolete, never sent by QEMU 7.2)'],
  [RamFlag.XBZRLE, 'RAM_SAVE_FLAG_XBZRLE (the xbzrle capability must be off)'],
  [RamFlag.HOOK, 'RAM_SAVE_FLAG_HOOK (RDMA migration is not supported)'],
  [RamFlag.COMPRESS_PAGE, 'RAM_SAVE_FLAG_COMPRESS_PAGE (the compress capability must be off)'],
];

/** MIG_CMD_* numbers that belong to postcopy or packaged streams, which this reader does not follow. */
const REFUSED_COMMANDS: ReadonlyMap<number, string> = new Map([
  [3, 'MIG_CMD_POSTCOPY_ADVISE'],
  [4, 'MIG_CMD_POSTCOPY_LISTEN'],
  [5, 'MIG_CMD_POSTCOPY_RUN'],
  [6, 'MIG_CMD_POSTCOPY_RAM_DISCARD'],
  [7, 'MIG_CMD_POSTCOPY_RESUME'],
  [8, 'MIG_CMD_PACKAGED'],
]);

/** The iterable section whose content this reader understands. */
export const RAM_SECTION_IDSTR = 'ram';

const CONFIG_TARGET_PAGE_BITS = 'configuration/target-page-bits';
const CONFIG_CAPABILITIES = 'configuration/capabilities';
const CONFIG_UUID = 'configuration/uuid';
const DEFAULT_TARGET_PAGE_BITS = 12;

export interface RamBlockInfo {
  idstr: string;
  lengthBytes: number;
  /** the block's guest-physical address, sent only with the x-ignore-shared capability */
  address?: number;
}

export type SectionPhase = 'start' | 'part' | 'end' | 'full';

export type MigrationRecord =
  | { kind: 'header'; version: number }
  | {
      kind: 'configuration';
      machineType: string;
      /** migration capabilities the destination must also have (QEMU sends x-ignore-shared here) */
      capabilities?: string[];
      targetPageBits?: number;
      uuid?: Buffer;
    }
  /** a RAM section opens; its records follow until `ram-eos` */
  | { kind: 'ram-section'; phase: Exclude<SectionPhase, 'full'>; sectionId: number; instanceId?: number; versionId?: number }
  | { kind: 'ram-blocks'; totalBytes: number; blocks: RamBlockInfo[] }
  | { kind: 'ram-page'; block: string; offset: number; data: Buffer }
  | { kind: 'ram-zero'; block: string; offset: number; fill: number }
  /** the end of a RAM section (RAM_SAVE_FLAG_EOS, then its footer) */
  | { kind: 'ram-eos'; sectionId: number }
  /** another device's section, header to footer, passed through verbatim */
  | { kind: 'device-section'; phase: SectionPhase; sectionId: number; idstr: string; instanceId?: number; versionId?: number; bytes: Buffer }
  | { kind: 'command'; command: number; bytes: Buffer }
  | { kind: 'eof' }
  | { kind: 'vm-description'; json: string };

export type MigrationErrorKind = 'truncated' | 'malformed' | 'unsupported';

/** A stream this reader cannot follow, at `offset` bytes from its start. */
export class MigrationStreamError extends Error {
  override name = 'MigrationStreamError';
  constructor(
    readonly kind: MigrationErrorKind,
    readonly offset: number,
    readonly expected: string,
    detail?: string,
  ) {
    super(`migration stream ${kind} at byte ${offset}: expected ${expected}${detail ? `, ${detail}` : ''}`);
  }
}

export interface MigrationStreamOptions {
  /** section footers (on for every machine type since QEMU 2.4) */
  sectionFooters?: boolean;
  /** the largest opaque device section accepted, in bytes */
  maxSectionBytes?: number;
  /** the largest VM description JSON accepted, in bytes */
  maxDescriptionBytes?: number;
}

/** Thrown inside a step when the bytes it needs have not arrived yet. */
class NeedMore {
  constructor(
    readonly offset: number,
    readonly expected: string,
  ) {}
}

/** Received bytes not yet parsed, as the chunks they came in; merged only as far as a record needs. */
class ByteQueue {
  private chunks: Buffer[] = [];
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.byteLength === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.byteLength;
  }

  /** The first chunk, grown to hold at least `n` bytes (n <= length). */
  head(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.byteLength >= n) return first;
    const parts = [first];
    let have = first.byteLength;
    let i = 1;
    while (have < n) {
      const c = this.chunks[i]!;
      const take = Math.min(c.byteLength, n - have);
      have += take;
      if (take === c.byteLength) {
        parts.push(c);
        i++;
      } else {
        parts.push(c.subarray(0, take));
        this.chunks[i] = c.subarray(take);
      }
    }
    const merged = Buffer.concat(parts);
    this.chunks.splice(0, i, merged);
    return merged;
  }

  consume(n: number): void {
    this.length -= n;
    while (n > 0) {
      const first = this.chunks[0]!;
      if (first.byteLength <= n) {
        this.chunks.shift();
        n -= first.byteLength;
      } else {
        this.chunks[0] = first.subarray(n);
        n = 0;
      }
    }
  }
}

/** Reads from the front of the queue without consuming; throws NeedMore past the bytes received. */
class Cursor {
  pos = 0;
  private buf: Buffer = Buffer.alloc(0);

  constructor(
    private readonly queue: ByteQueue,
    readonly base: number,
  ) {}

  get available(): number {
    return this.queue.length;
  }

  /** The received bytes from the front, at least `end` of them. */
  view(end: number, expected: string): Buffer {
    if (end > this.queue.length) throw new NeedMore(this.base + this.pos, expected);
    if (this.buf.byteLength < end) this.buf = this.queue.head(end);
    return this.buf;
  }

  u8(expected: string): number {
    return this.view(this.pos + 1, expected)[this.pos++]!;
  }

  u16(expected: string): number {
    const v = this.view(this.pos + 2, expected).readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }

  u32(expected: string): number {
    const v = this.view(this.pos + 4, expected).readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }

  u64(expected: string): bigint {
    const v = this.view(this.pos + 8, expected).readBigUInt64BE(this.pos);
    this.pos += 8;
    return v;
  }

  /** a copy, so that a record never pins the socket's chunk */
  bytes(n: number, expected: string): Buffer {
    const b = Buffer.from(this.view(this.pos + n, expected).subarray(this.pos, this.pos + n));
    this.pos += n;
    return b;
  }

  /** a 1-byte length and that many bytes of text (QEMU's idstr) */
  idstr(expected: string): string {
    const len = this.u8(`the length of ${expected}`);
    return this.bytes(len, expected).toString('latin1');
  }

  fail(kind: MigrationErrorKind, expected: string, detail?: string, at = this.pos): never {
    throw new MigrationStreamError(kind, this.base + at, expected, detail);
  }
}

function hex(n: number): string {
  return `0x${n.toString(16).padStart(2, '0')}`;
}

const PRINTABLE = /^[\x20-\x7e]+$/;

type State = 'header' | 'configuration' | 'sections' | 'ram' | 'after-eof' | 'done';

/** One open iterable section: its idstr, for PART and END headers that carry only the id. */
interface OpenSection {
  idstr: string;
}

/**
 * The incremental reader. `push` returns the records completed by a chunk (none while a record is
 * still partial); `end` says the stream is over and throws if it stopped inside a record.
 */
export class MigrationStreamParser {
  private readonly queue = new ByteQueue();
  private consumed = 0;
  private state: State = 'header';
  private ended = false;
  private readonly footers: boolean;
  private readonly maxSectionBytes: number;
  private readonly maxDescriptionBytes: number;
  private pageBits = DEFAULT_TARGET_PAGE_BITS;
  private ignoreShared = false;
  private readonly sections = new Map<number, OpenSection>();
  private ramSectionId = -1;
  private readonly blockLengths = new Map<string, number>();
  private lastBlock: string | undefined;
  /** state changes of the record being read, applied once it is complete (a retry reads it again) */
  private effects: (() => void)[] = [];
  /** where the footer scan of the device section at `sectionAt` goes on (bytes already ruled out) */
  private scan = { sectionAt: -1, from: 0 };

  constructor(options: MigrationStreamOptions = {}) {
    this.footers = options.sectionFooters ?? true;
    this.maxSectionBytes = options.maxSectionBytes ?? 64 << 20;
    this.maxDescriptionBytes = options.maxDescriptionBytes ?? 16 << 20;
  }

  /** bytes of the stream parsed into records so far */
  get offset(): number {
    return this.consumed;
  }

  /** the target page size: RAM pages carry this many bytes */
  get pageBytes(): number {
    return 1 << this.pageBits;
  }

  push(chunk: Buffer): MigrationRecord[] {
    if (this.ended) throw new Error('push after end');
    this.queue.push(chunk);
    return this.drain();
  }

  end(): MigrationRecord[] {
    this.ended = true;
    const records = this.drain();
    if (this.queue.length > 0 || (this.state !== 'after-eof' && this.state !== 'done')) {
      // drain stopped on a partial record: name it
      try {
        this.step();
      } catch (err) {
        if (err instanceof NeedMore) throw new MigrationStreamError('truncated', err.offset, err.expected, `the stream ends at byte ${this.consumed + this.queue.length}`);
        throw err;
      }
      throw new MigrationStreamError('truncated', this.consumed, 'QEMU_VM_EOF', `the stream ends at byte ${this.consumed + this.queue.length}`);
    }
    return records;
  }

  private drain(): MigrationRecord[] {
    const records: MigrationRecord[] = [];
    for (;;) {
      if (this.queue.length === 0) break;
      let record: MigrationRecord | undefined;
      try {
        record = this.step();
      } catch (err) {
        if (err instanceof NeedMore) break;
        throw err;
      }
      if (record) records.push(record);
      else break;
    }
    return records;
  }

  /** Parses one record from the front, consuming it; NeedMore leaves everything in place. */
  private step(): MigrationRecord | undefined {
    const c = new Cursor(this.queue, this.consumed);
    this.effects = [];
    const record = this.read(c);
    if (record) {
      this.queue.consume(c.pos);
      this.consumed += c.pos;
      for (const effect of this.effects) effect();
    }
    return record;
  }

  private read(c: Cursor): MigrationRecord | undefined {
    switch (this.state) {
      case 'header': {
        const magic = c.u32('the magic QEVM (0x5145564d)');
        if (magic !== QEMU_VM_FILE_MAGIC) c.fail('malformed', 'the magic QEVM (0x5145564d)', `found 0x${magic.toString(16)}`, 0);
        const version = c.u32('the stream version 3');
        if (version !== QEMU_VM_FILE_VERSION) c.fail('unsupported', 'the stream version 3', `found ${version}`, 4);
        this.effects.push(() => (this.state = 'configuration'));
        return { kind: 'header', version };
      }
      case 'configuration': {
        const type = c.view(1, 'QEMU_VM_CONFIGURATION (0x07) or a section')[0];
        if (type !== SectionType.CONFIGURATION) {
          // streams may omit it (machine types that do not send their configuration)
          this.effects.push(() => (this.state = 'sections'));
          return this.readSection(c);
        }
        c.pos++;
        return this.readConfiguration(c);
      }
      case 'sections':
        return this.readSection(c);
      case 'ram':
        return this.readRam(c);
      case 'after-eof': {
        const type = c.u8('QEMU_VM_VMDESCRIPTION (0x06)');
        if (type !== SectionType.VMDESCRIPTION) c.fail('malformed', 'QEMU_VM_VMDESCRIPTION (0x06) or the end of the stream', `found ${hex(type)}`, 0);
        const len = c.u32('the VM description length');
        if (len > this.maxDescriptionBytes) c.fail('malformed', `a VM description of at most ${this.maxDescriptionBytes} bytes`, `found ${len}`, 1);
        const json = c.bytes(len, 'the VM description JSON').toString('utf8');
        this.effects.push(() => (this.state = 'done'));
        return { kind: 'vm-description', json };
      }
      case 'done':
        if (this.queue.length > 0) c.fail('malformed', 'the end of the stream after the VM description', `found ${this.queue.length} more bytes`);
        return undefined;
    }
  }

  private readConfiguration(c: Cursor): MigrationRecord {
    const len = c.u32('the machine type length');
    if (len === 0 || len > 256) c.fail('malformed', 'a machine type of 1 to 256 bytes', `found length ${len}`, c.pos - 4);
    const machineType = c.bytes(len, 'the machine type').toString('latin1');
    const record: Extract<MigrationRecord, { kind: 'configuration' }> = { kind: 'configuration', machineType };
    while (c.view(c.pos + 1, 'a configuration subsection or the first section')[c.pos] === SectionType.SUBSECTION) {
      c.pos++;
      const at = c.pos;
      const name = c.idstr('a configuration subsection name');
      c.u32(`the version of ${name}`);
      if (name === CONFIG_TARGET_PAGE_BITS) record.targetPageBits = c.u32('the target page bits');
      else if (name === CONFIG_CAPABILITIES) {
        const count = c.u32('the capability count');
        record.capabilities = [];
        for (let i = 0; i < count; i++) record.capabilities.push(c.idstr('a capability name'));
      } else if (name === CONFIG_UUID) record.uuid = c.bytes(16, 'the VM UUID');
      else c.fail('unsupported', `a configuration subsection QEMU 7.2 sends (${[CONFIG_TARGET_PAGE_BITS, CONFIG_CAPABILITIES, CONFIG_UUID].join(', ')})`, `found "${name}"`, at);
    }
    const pageBits = record.targetPageBits ?? DEFAULT_TARGET_PAGE_BITS;
    if (pageBits < 9 || pageBits > 16) c.fail('malformed', 'target page bits of 9 to 16', `found ${pageBits}`);
    this.effects.push(() => {
      this.pageBits = pageBits;
      this.ignoreShared = record.capabilities?.includes('x-ignore-shared') ?? false;
      this.state = 'sections';
    });
    return record;
  }

  private readSection(c: Cursor): MigrationRecord {
    const type = c.u8('a section type (START 0x01, PART 0x02, END 0x03, FULL 0x04, COMMAND 0x08, EOF 0x00)');
    switch (type) {
      case SectionType.EOF:
        if (this.sections.size > 0) c.fail('malformed', `the END of section ${[...this.sections.keys()].join(', ')} before QEMU_VM_EOF`, undefined, 0);
        this.effects.push(() => (this.state = 'after-eof'));
        return { kind: 'eof' };
      case SectionType.START:
      case SectionType.FULL: {
        const sectionId = c.u32('a section id');
        const idstr = c.idstr('a section idstr');
        const instanceId = c.u32(`the instance id of section "${idstr}"`);
        const versionId = c.u32(`the version id of section "${idstr}"`);
        if (type === SectionType.START) {
          if (this.sections.has(sectionId)) c.fail('malformed', `a new section id`, `section ${sectionId} is already open`, 1);
          this.effects.push(() => this.sections.set(sectionId, { idstr }));
          if (idstr === RAM_SECTION_IDSTR) return this.enterRam(sectionId, 'start', { instanceId, versionId });
        } else if (idstr === RAM_SECTION_IDSTR) c.fail('malformed', 'RAM in START/PART/END sections', 'found a FULL section "ram"', 0);
        return this.readDeviceSection(c, type === SectionType.START ? 'start' : 'full', sectionId, idstr, { instanceId, versionId });
      }
      case SectionType.PART:
      case SectionType.END: {
        const sectionId = c.u32('a section id');
        const open = this.sections.get(sectionId) ?? c.fail('malformed', 'the id of a section opened by START', `found ${sectionId}`, 1);
        const phase = type === SectionType.PART ? 'part' : 'end';
        if (phase === 'end') this.effects.push(() => this.sections.delete(sectionId));
        if (open.idstr === RAM_SECTION_IDSTR) return this.enterRam(sectionId, phase);
        return this.readDeviceSection(c, phase, sectionId, open.idstr, {});
      }
      case SectionType.COMMAND: {
        const command = c.u16('a command number');
        const len = c.u16('a command length');
        const refused = REFUSED_COMMANDS.get(command);
        if (refused) c.fail('unsupported', 'a precopy stream', `found command ${refused} (postcopy must be off)`, 1);
        c.bytes(len, `the data of command ${command}`);
        return { kind: 'command', command, bytes: this.copyFront(c) };
      }
      default:
        return c.fail('malformed', 'a section type (START 0x01, PART 0x02, END 0x03, FULL 0x04, COMMAND 0x08, EOF 0x00)', `found ${hex(type)}`, 0);
    }
  }

  private enterRam(sectionId: number, phase: 'start' | 'part' | 'end', ids: { instanceId?: number; versionId?: number } = {}): MigrationRecord {
    this.effects.push(() => {
      this.ramSectionId = sectionId;
      this.state = 'ram';
    });
    return { kind: 'ram-section', phase, sectionId, ...ids };
  }

  private copyFront(c: Cursor): Buffer {
    return Buffer.from(c.view(c.pos, 'a section').subarray(0, c.pos));
  }

  /**
   * Another device's section: its content is that device's own format, so its end is found by its
   * footer (0x7e and its section id) followed by a plausible next section. The bytes travel as they are.
   */
  private readDeviceSection(c: Cursor, phase: SectionPhase, sectionId: number, idstr: string, ids: { instanceId?: number; versionId?: number }): MigrationRecord {
    if (!this.footers) c.fail('unsupported', 'section footers', `cannot find the end of section "${idstr}" without them`, 0);
    const bodyAt = c.pos;
    if (this.scan.sectionAt !== this.consumed) this.scan = { sectionAt: this.consumed, from: bodyAt };
    const footer = Buffer.alloc(5);
    footer[0] = SectionType.FOOTER;
    footer.writeUInt32BE(sectionId, 1);
    for (;;) {
      const avail = c.view(c.available, 'a section footer');
      const found = avail.indexOf(footer, this.scan.from);
      const limitReached = (found < 0 ? avail.byteLength : found) - bodyAt > this.maxSectionBytes;
      if (limitReached) c.fail('malformed', `the footer of section ${sectionId} ("${idstr}") within ${this.maxSectionBytes} bytes`, undefined, 0);
      if (found < 0) {
        // a footer may straddle what has arrived: keep its first 4 bytes for the next try
        this.scan.from = Math.max(bodyAt, avail.byteLength - 4);
        throw new NeedMore(this.consumed + avail.byteLength, `the footer of section ${sectionId} ("${idstr}")`);
      }
      this.scan.from = found;
      if (this.plausibleNext(c, found + 5)) {
        c.pos = found + 5;
        this.scan = { sectionAt: -1, from: 0 };
        return { kind: 'device-section', phase, sectionId, idstr, ...ids, bytes: this.copyFront(c) };
      }
      this.scan.from = found + 1;
    }
  }

  /** Whether the bytes at `at` begin what may follow a section; NeedMore until that is decided. */
  private plausibleNext(c: Cursor, at: number): boolean {
    const what = 'the section after a footer';
    if (at === c.available && this.ended) return false;
    const b = c.view(at + 1, what);
    switch (b[at]) {
      case SectionType.EOF: {
        if (at + 1 === c.available && this.ended) return true;
        const v = c.view(at + 7, what);
        return v[at + 1] === SectionType.VMDESCRIPTION && v[at + 6] === 0x7b; // '{'
      }
      case SectionType.START:
      case SectionType.FULL: {
        const len = c.view(at + 6, what)[at + 5]!;
        if (len === 0) return false;
        const v = c.view(at + 6 + len + 8, what);
        const idstr = v.subarray(at + 6, at + 6 + len).toString('latin1');
        return PRINTABLE.test(idstr) && v.readUInt32BE(at + 6 + len) <= 0xffffff && v.readUInt32BE(at + 10 + len) <= 0xffff;
      }
      case SectionType.PART:
      case SectionType.END:
        return this.sections.has(c.view(at + 5, what).readUInt32BE(at + 1));
      case SectionType.COMMAND: {
        const command = c.view(at + 3, what).readUInt16BE(at + 1);
        return command >= 1 && command <= 15;
      }
      default:
        return false;
    }
  }

  private readRam(c: Cursor): MigrationRecord {
    const word = c.u64('a RAM record (be64 offset | flags)');
    const flagMask = (1 << this.pageBits) - 1;
    const flags = Number(word & BigInt(flagMask));
    const address = Number(word & ~BigInt(flagMask));
    for (const [flag, name] of REFUSED_RAM_FLAGS) if (flags & flag) c.fail('unsupported', 'RAM records of kind ZERO, PAGE, MEM_SIZE or EOS', `found ${name}`, 0);
    const unknown = flags & ~(RamFlag.ZERO | RamFlag.MEM_SIZE | RamFlag.PAGE | RamFlag.EOS | RamFlag.CONTINUE);
    if (unknown) c.fail('unsupported', 'known RAM flags', `found unknown flag bits ${hex(unknown)}`, 0);
    const kind = flags & ~RamFlag.CONTINUE;
    switch (kind) {
      case RamFlag.MEM_SIZE:
        return this.readBlockList(c, address);
      case RamFlag.ZERO:
      case RamFlag.PAGE: {
        const block = this.blockOf(c, flags);
        const length = this.blockLengths.get(block) ?? c.fail('malformed', 'a RAM block announced by MEM_SIZE', `found "${block}"`, 0);
        if (address + this.pageBytes > length) c.fail('malformed', `an offset inside RAM block "${block}" (${length} bytes)`, `found ${address}`, 0);
        if (kind === RamFlag.ZERO) return { kind: 'ram-zero', block, offset: address, fill: c.u8('the fill byte of a zero page') };
        return { kind: 'ram-page', block, offset: address, data: c.bytes(this.pageBytes, `a ${this.pageBytes}-byte page`) };
      }
      case RamFlag.EOS: {
        if (this.footers) {
          const mark = c.u8('a section footer (0x7e)');
          if (mark !== SectionType.FOOTER) c.fail('malformed', 'a section footer (0x7e) after RAM_SAVE_FLAG_EOS', `found ${hex(mark)}`, c.pos - 1);
          const id = c.u32('the section id in the footer');
          if (id !== this.ramSectionId) c.fail('malformed', `the footer of RAM section ${this.ramSectionId}`, `found section id ${id}`, c.pos - 4);
        }
        this.effects.push(() => (this.state = 'sections'));
        return { kind: 'ram-eos', sectionId: this.ramSectionId };
      }
      default:
        return c.fail('malformed', 'one of RAM_SAVE_FLAG_ZERO, PAGE, MEM_SIZE, EOS', `found the combination ${hex(flags)}`, 0);
    }
  }

  private blockOf(c: Cursor, flags: number): string {
    if (flags & RamFlag.CONTINUE) return this.lastBlock ?? c.fail('malformed', 'a RAM block idstr', 'RAM_SAVE_FLAG_CONTINUE before any block was named', 0);
    const block = c.idstr('a RAM block idstr');
    this.effects.push(() => (this.lastBlock = block));
    return block;
  }

  private readBlockList(c: Cursor, totalBytes: number): MigrationRecord {
    const blocks: RamBlockInfo[] = [];
    let left = totalBytes;
    while (left > 0) {
      const idstr = c.idstr('a RAM block idstr in MEM_SIZE');
      const lengthBytes = Number(c.u64(`the used length of RAM block "${idstr}"`));
      if (lengthBytes > left) c.fail('malformed', `RAM block lengths adding up to the MEM_SIZE total ${totalBytes}`, `"${idstr}" has ${lengthBytes} bytes, ${left} left`, c.pos - 8);
      const info: RamBlockInfo = { idstr, lengthBytes };
      if (this.ignoreShared) info.address = Number(c.u64(`the address of RAM block "${idstr}"`));
      blocks.push(info);
      left -= lengthBytes;
    }
    this.effects.push(() => {
      this.blockLengths.clear();
      for (const b of blocks) this.blockLengths.set(b.idstr, b.lengthBytes);
    });
    return { kind: 'ram-blocks', totalBytes, blocks };
  }
}

/** The records of a stream read from `source` (a socket, a file stream), as they complete. */
export async function* parseMigrationStream(source: AsyncIterable<Buffer>, options?: MigrationStreamOptions): AsyncGenerator<MigrationRecord> {
  const parser = new MigrationStreamParser(options);
  for await (const chunk of source) yield* parser.push(chunk);
  yield* parser.end();
}
