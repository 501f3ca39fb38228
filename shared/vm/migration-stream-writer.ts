/**
 * Builds a QEMU 7.2 migration stream from the parser's records, for a destination QEMU's
 * `migrate-incoming`: header, configuration, RAM sections with their pages, the other devices'
 * sections as they came, EOF and the VM description. The writer decides RAM_SAVE_FLAG_CONTINUE
 * itself (the block of the previous page record it wrote), so records may be dropped or reordered.
 */
import { QEMU_VM_FILE_MAGIC, RamFlag, SectionType, type MigrationRecord, type MigrationStreamOptions } from './migration-stream.js';

function idstrBytes(idstr: string, what: string): Buffer {
  const b = Buffer.from(idstr, 'latin1');
  if (b.byteLength === 0 || b.byteLength > 255) throw new RangeError(`${what} "${idstr}" must be 1 to 255 bytes`);
  return Buffer.concat([Buffer.from([b.byteLength]), b]);
}

function be32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

function be64(n: number | bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
}

function subsection(name: string, body: Buffer[]): Buffer[] {
  return [Buffer.from([SectionType.SUBSECTION]), idstrBytes(name, 'a subsection name'), be32(1), ...body];
}

export class MigrationStreamWriter {
  private lastBlock: string | undefined;
  private ignoreShared = false;
  private pageBytes = 4096;
  private readonly footers: boolean;

  constructor(options: Pick<MigrationStreamOptions, 'sectionFooters'> = {}) {
    this.footers = options.sectionFooters ?? true;
  }

  /** The bytes of one record. */
  encode(record: MigrationRecord): Buffer {
    return Buffer.concat(this.parts(record));
  }

  private parts(record: MigrationRecord): Buffer[] {
    switch (record.kind) {
      case 'header':
        return [be32(QEMU_VM_FILE_MAGIC), be32(record.version)];
      case 'configuration': {
        const name = Buffer.from(record.machineType, 'latin1');
        const out = [Buffer.from([SectionType.CONFIGURATION]), be32(name.byteLength), name];
        if (record.targetPageBits !== undefined) {
          out.push(...subsection('configuration/target-page-bits', [be32(record.targetPageBits)]));
          this.pageBytes = 1 << record.targetPageBits;
        }
        if (record.capabilities) out.push(...subsection('configuration/capabilities', [be32(record.capabilities.length), ...record.capabilities.map((c) => idstrBytes(c, 'a capability'))]));
        if (record.uuid) out.push(...subsection('configuration/uuid', [record.uuid]));
        this.ignoreShared = record.capabilities?.includes('x-ignore-shared') ?? false;
        return out;
      }
      case 'ram-section': {
        const type = { start: SectionType.START, part: SectionType.PART, end: SectionType.END }[record.phase];
        const out = [Buffer.from([type]), be32(record.sectionId)];
        if (record.phase === 'start') out.push(idstrBytes('ram', 'a section idstr'), be32(record.instanceId ?? 0), be32(record.versionId ?? 4));
        return out;
      }
      case 'ram-blocks': {
        const out = [be64(BigInt(record.totalBytes) | BigInt(RamFlag.MEM_SIZE))];
        for (const b of record.blocks) {
          out.push(idstrBytes(b.idstr, 'a RAM block idstr'), be64(b.lengthBytes));
          if (this.ignoreShared) out.push(be64(b.address ?? 0));
        }
        return out;
      }
      case 'ram-page':
        if (record.data.byteLength !== this.pageBytes) throw new RangeError(`a RAM page must be ${this.pageBytes} bytes, got ${record.data.byteLength}`);
        return [...this.pageHeader(record.block, record.offset, RamFlag.PAGE), record.data];
      case 'ram-zero':
        return [...this.pageHeader(record.block, record.offset, RamFlag.ZERO), Buffer.from([record.fill])];
      case 'ram-eos':
        return [be64(RamFlag.EOS), ...this.footer(record.sectionId)];
      case 'device-section':
      case 'command':
        return [record.bytes];
      case 'eof':
        return [Buffer.from([SectionType.EOF])];
      case 'vm-description': {
        const json = Buffer.from(record.json, 'utf8');
        return [Buffer.from([SectionType.VMDESCRIPTION]), be32(json.byteLength), json];
      }
    }
  }

  private pageHeader(block: string, offset: number, flag: number): Buffer[] {
    if (offset % this.pageBytes !== 0) throw new RangeError(`a RAM page offset must be page-aligned, got ${offset}`);
    if (block === this.lastBlock) return [be64(BigInt(offset) | BigInt(flag | RamFlag.CONTINUE))];
    this.lastBlock = block;
    return [be64(BigInt(offset) | BigInt(flag)), idstrBytes(block, 'a RAM block idstr')];
  }

  private footer(sectionId: number): Buffer[] {
    return this.footers ? [Buffer.from([SectionType.FOOTER]), be32(sectionId)] : [];
  }
}

/** A whole stream's bytes from its records (for tests and small streams). */
export function encodeMigrationStream(records: Iterable<MigrationRecord>, options?: Pick<MigrationStreamOptions, 'sectionFooters'>): Buffer {
  const writer = new MigrationStreamWriter(options);
  return Buffer.concat([...records].map((r) => writer.encode(r)));
}
