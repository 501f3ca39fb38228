/**
 * The pure parts of resuming the source's own machine from QEMU's migration stream: the
 * destination's command line (the source's, or the operator's, with this cloudlet's paths), why a
 * destination cannot take a source's machine (named difference by difference, before any page
 * moves), the memory pages the rebuild wrote since they were last fed to QEMU, and the stream
 * records that feed them.
 */
import { basename, join } from 'node:path';
import { PAGE_SIZE } from '../../shared/image/pages.js';
import type { SourceMachine } from '../../shared/model/migration.js';
import type { MigrationRecord } from '../../shared/vm/migration-stream.js';
import { compareMachines, describeMachine, isLegacyDriveOption, isQemuFlag, parseQemuOpts, type MachineDescription } from '../../shared/vm/qemu-process.js';
import type { RamBlockPlacement } from '../../shared/vm/ram-image.js';

/** What the mapping asks of this host's files (injected: tests give their own). */
export interface HostFiles {
  exists(path: string): boolean;
  isDirectory(path: string): boolean;
}

export interface DestinationPaths {
  /** the migration's folder here: sockets, logs and the pid file go into it */
  dir: string;
  /** the rebuilt disk QEMU runs on */
  disk: string;
}

export interface DestinationCommand {
  /** program first, ending with `-S -incoming defer` */
  argv: string[];
  /** the QMP socket the receiver drives QEMU through (the first -qmp, or one added) */
  qmpSocket: string;
  /** where the guest's first serial port writes, '' when nowhere in the folder */
  serialLog: string;
  /** why this command line cannot run here (a path this host lacks, a disk not handed off) */
  problems: string[];
}

function escapeOptValue(value: string): string {
  return value.replace(/,/g, ',,');
}

/** QemuOpts text from `opts`, `impliedKey`'s value first and bare when it is there. */
function formatQemuOpts(opts: Map<string, string>, impliedKey?: string): string {
  const parts: string[] = [];
  const implied = impliedKey === undefined ? undefined : opts.get(impliedKey);
  if (implied !== undefined) parts.push(escapeOptValue(implied));
  for (const [k, v] of opts) if (k !== impliedKey || implied === undefined) parts.push(`${k}=${escapeOptValue(v)}`);
  return parts.join(',');
}

/** a chardev id as a file name */
function fileName(id: string): string {
  return id.replace(/[^A-Za-z0-9_.-]/g, '_');
}

/** the longest path a unix socket may have (sun_path less its terminating NUL) */
export const MAX_SOCKET_PATH_BYTES = 107;

/** -serial and -monitor values that name no host path: kept as they are */
const KEPT_CHAR_SPECS = /^(none|null|pty|vc(:.*)?|chardev:.*)$/;
/** options whose value is a path on this host that QEMU reads: kept, and it must exist here */
const KEPT_PATH_OPTIONS = new Set(['kernel', 'initrd', 'bios', 'dtb', 'L']);

/**
 * The command line the destination runs: `argv` (the source's, or the operator's) with this
 * cloudlet's paths. Drive `diskDrive` (its position among the drives, as describeMachine counts
 * them) runs on the rebuilt disk; -qmp, -monitor, -serial, file and socket chardevs, -pidfile and
 * a file-backed RAM's mem-path go into the migration's folder; -kernel, -initrd, -bios, -dtb and -L
 * are kept and must exist here; -daemonize, -S and -incoming are dropped for `-S -incoming defer`.
 */
export function destinationCommand(argv: readonly string[], diskDrive: number, paths: DestinationPaths, host: HostFiles): DestinationCommand {
  const { dir } = paths;
  const problems: string[] = [];
  const hasProgram = argv[0] !== undefined && !argv[0].startsWith('-');
  const program = hasProgram ? (host.exists(argv[0]!) ? argv[0]! : basename(argv[0]!)) : 'qemu-system-x86_64';
  const args = hasProgram ? argv.slice(1) : argv;
  const out: string[] = [program];
  let qmpSocket = '';
  let drive = 0;
  let qmps = 0;
  let monitors = 0;
  let serials = 0;
  let chardevs = 0;
  const numbered = (name: string, n: number, ext: string): string => join(dir, `${name}${n === 0 ? '' : `-${n}`}.${ext}`);
  const sockets: string[] = [];
  const socketAt = (path: string): string => {
    sockets.push(path);
    return path;
  };
  /** chardev id -> the file it now writes */
  const chardevFiles = new Map<string, string>();
  let firstSerial: { file?: string; chardev?: string } | undefined;
  const driveFile = (file: string, what: string): string => {
    const n = drive++;
    if (n === diskDrive) return paths.disk;
    problems.push(`drive ${n} (${what}, ${file}) is not the handed-off disk: a handoff carries one disk`);
    return file;
  };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (!arg.startsWith('-')) {
      // a bare image path is -hda
      out.push(driveFile(arg, 'an image path'));
      continue;
    }
    const name = arg.replace(/^--?/, '');
    if (isQemuFlag(name)) {
      if (name !== 'daemonize' && name !== 'S') out.push(arg);
      continue;
    }
    const value = args[++i];
    if (value === undefined) throw new Error(`${arg} needs an argument`);
    switch (name) {
      case 'incoming':
        break;
      case 'qmp':
      case 'qmp-pretty': {
        const socket = socketAt(numbered('qmp', qmps++, 'sock'));
        qmpSocket ||= socket;
        out.push(arg, `unix:${socket},server=on,wait=off`);
        break;
      }
      case 'monitor':
        out.push(arg, KEPT_CHAR_SPECS.test(value) ? value : `unix:${socketAt(numbered('monitor', monitors++, 'sock'))},server=on,wait=off`);
        break;
      case 'serial': {
        const file = KEPT_CHAR_SPECS.test(value) ? undefined : numbered('serial', serials++, 'log');
        firstSerial ??= file ? { file } : { chardev: /^chardev:(.*)$/.exec(value)?.[1] };
        out.push(arg, file ? `file:${file}` : value);
        break;
      }
      case 'chardev': {
        const opts = parseQemuOpts(value, 'backend');
        const id = fileName(opts.get('id') ?? `chardev${chardevs}`);
        chardevs++;
        const backend = opts.get('backend');
        if (backend === 'file' || backend === 'stdio') {
          // stdio has nothing to talk to in a detached QEMU: a file in the folder instead
          opts.set('backend', 'file');
          opts.delete('signal');
          opts.set('path', join(dir, `${id}.log`));
          chardevFiles.set(opts.get('id') ?? id, join(dir, `${id}.log`));
        } else if (backend === 'socket' && opts.has('path')) opts.set('path', socketAt(join(dir, `${id}.sock`)));
        if (opts.has('logfile')) opts.set('logfile', join(dir, `${id}.chardev.log`));
        out.push(arg, formatQemuOpts(opts, 'backend'));
        break;
      }
      case 'pidfile':
        out.push(arg, join(dir, 'qemu.pid'));
        break;
      case 'drive': {
        const opts = parseQemuOpts(value, 'file');
        const file = opts.get('file');
        if (file === undefined) {
          drive++;
          out.push(arg, value);
          break;
        }
        opts.set('file', driveFile(file, `-drive if=${opts.get('if') ?? 'ide'}`));
        out.push(arg, formatQemuOpts(opts));
        break;
      }
      case 'blockdev':
        problems.push(`-blockdev ${value}: the destination runs drives of -drive, -hda and the like only`);
        out.push(arg, value);
        break;
      case 'object': {
        const opts = parseQemuOpts(value, 'qom-type');
        const memPath = opts.get('mem-path');
        if (opts.get('qom-type') === 'memory-backend-file' && memPath !== undefined && !host.isDirectory(memPath)) {
          // the RAM comes in the stream: the backing file is this cloudlet's own
          opts.set('mem-path', join(dir, `${fileName(opts.get('id') ?? 'mem')}.ram`));
          out.push(arg, formatQemuOpts(opts, 'qom-type'));
        } else out.push(arg, value);
        break;
      }
      default:
        if (isLegacyDriveOption(name)) out.push(arg, driveFile(value, arg));
        else {
          if (KEPT_PATH_OPTIONS.has(name) && !host.exists(value)) problems.push(`${arg} ${value}: no such file at the destination`);
          out.push(arg, value);
        }
    }
  }
  if (!qmpSocket) {
    qmpSocket = socketAt(numbered('qmp', qmps, 'sock'));
    out.push('-qmp', `unix:${qmpSocket},server=on,wait=off`);
  }
  if (diskDrive >= drive) problems.push(`the base's disk is drive ${diskDrive}, the command line has ${drive} drive${drive === 1 ? '' : 's'}`);
  for (const socket of sockets) {
    if (Buffer.byteLength(socket) > MAX_SOCKET_PATH_BYTES) problems.push(`the socket ${socket} is longer than a unix socket's path may be (${MAX_SOCKET_PATH_BYTES} bytes): give a shorter --out`);
  }
  out.push('-S', '-incoming', 'defer');
  const serialLog = firstSerial?.file ?? (firstSerial?.chardev !== undefined ? chardevFiles.get(firstSerial.chardev) : undefined) ?? '';
  return { argv: out, qmpSocket, serialLog, problems };
}

function sizeText(bytes: number): string {
  if (bytes % 2 ** 20 === 0) return `${bytes / 2 ** 20} MiB`;
  if (bytes % 2 ** 10 === 0) return `${bytes / 2 ** 10} KiB`;
  return `${bytes} bytes`;
}

/** How the source's RAM blocks differ from the destination base's (which its memory image holds), in words. */
export function ramBlockDifferences(source: readonly RamBlockPlacement[], base: readonly RamBlockPlacement[]): string[] {
  const differences: string[] = [];
  const inBase = new Map(base.map((b) => [b.idstr, b]));
  const inSource = new Set(source.map((b) => b.idstr));
  for (const s of source) {
    const b = inBase.get(s.idstr);
    if (!b) differences.push(`RAM block ${s.idstr} (${sizeText(s.bytes)}) missing at the destination`);
    else if (b.bytes !== s.bytes) differences.push(`RAM block ${s.idstr}: source ${sizeText(s.bytes)}, destination ${sizeText(b.bytes)}`);
    else if (b.offset !== s.offset) differences.push(`RAM block ${s.idstr}: at byte ${s.offset} of the source's memory image, ${b.offset} of the destination's`);
  }
  for (const b of base) if (!inSource.has(b.idstr)) differences.push(`RAM block ${b.idstr} (${sizeText(b.bytes)}) only at the destination`);
  if (differences.length === 0 && source.map((b) => b.idstr).join('\n') !== base.map((b) => b.idstr).join('\n')) {
    differences.push(`RAM blocks in another order: source ${source.map((b) => b.idstr).join(', ')}; destination ${base.map((b) => b.idstr).join(', ')}`);
  }
  return differences;
}

/** What a destination resuming machines from the stream checks a source's against. */
export interface StreamDestination {
  /** the base's RAM blocks, as its memory image places them */
  ramBlocks: RamBlockPlacement[];
  /** the machine the base was taken of: its RAM and device state are that machine's */
  baseMachine: MachineDescription;
  /** the base's (handed-off) disk: its position among the command line's drives */
  diskDrive: number;
  /** the operator's command line for the destination (program first); else the source's, mapped */
  qemuCommand?: string[];
  host: HostFiles;
}

/** Why this destination cannot resume the source's machine (every difference named), or undefined. */
export function streamRefusal(source: SourceMachine, d: StreamDestination): string | undefined {
  const differences = ramBlockDifferences(source.ramBlocks, d.ramBlocks);
  let command: DestinationCommand;
  try {
    // the paths do not enter the comparison: any folder does
    command = destinationCommand(d.qemuCommand ?? source.argv, d.diskDrive, { dir: '.', disk: 'disk.img' }, d.host);
  } catch (err) {
    return `the destination's QEMU command line cannot be read: ${(err as Error).message}`;
  }
  try {
    const sourceMachine = describeMachine(source.argv);
    differences.push(...compareMachines(d.baseMachine, sourceMachine, undefined, { source: 'base', destination: 'source' }));
    differences.push(...compareMachines(sourceMachine, describeMachine(command.argv)));
  } catch (err) {
    return `a QEMU command line cannot be read: ${(err as Error).message}`;
  }
  differences.push(...command.problems);
  return differences.length ? `the destination cannot run the source's machine: ${differences.join('; ')}` : undefined;
}

/** Memory pages written since they were last taken, one bit each. */
export class WrittenPages {
  private readonly bits: Uint8Array;
  private marked = 0;

  constructor(readonly pageCount: number) {
    this.bits = new Uint8Array(Math.ceil(pageCount / 8));
  }

  get count(): number {
    return this.marked;
  }

  mark(index: number): void {
    if (index < 0 || index >= this.pageCount) throw new RangeError(`page ${index} is past the end (${this.pageCount} pages)`);
    const bit = 1 << (index & 7);
    if (this.bits[index >> 3]! & bit) return;
    this.bits[index >> 3]! |= bit;
    this.marked++;
  }

  /** The marked pages in order (at most `limit`), unmarked by taking them. */
  take(limit = Infinity): number[] {
    const taken: number[] = [];
    for (let byte = 0; byte < this.bits.length && this.marked > 0 && taken.length < limit; byte++) {
      let b = this.bits[byte]!;
      if (b === 0) continue;
      for (let bit = 0; bit < 8 && taken.length < limit; bit++) {
        if (!(b & (1 << bit))) continue;
        taken.push(byte * 8 + bit);
        b &= ~(1 << bit);
        this.marked--;
      }
      this.bits[byte] = b;
    }
    return taken;
  }
}

/** Where a page of the flat memory image lies in the VM's RAM: a block and the offset in it. */
export class RamPageLocator {
  private readonly blocks: RamBlockPlacement[];

  constructor(blocks: readonly RamBlockPlacement[]) {
    this.blocks = [...blocks].sort((a, b) => a.offset - b.offset);
  }

  locate(index: number): { block: string; offset: number } {
    const at = index * PAGE_SIZE;
    let lo = 0;
    let hi = this.blocks.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const b = this.blocks[mid]!;
      if (at < b.offset) hi = mid - 1;
      else if (at >= b.offset + b.bytes) lo = mid + 1;
      else return { block: b.idstr, offset: at - b.offset };
    }
    throw new RangeError(`memory page ${index} lies in no RAM block of the base`);
  }
}

function isZeroPage(page: Buffer): boolean {
  for (let i = 0; i < page.byteLength; i += 8) if (page.readBigUInt64LE(i) !== 0n) return false;
  return true;
}

/** Runs of consecutive pages (at most `maxRun` each) among sorted page indices. */
export function pageRuns(indices: readonly number[], maxRun: number): { first: number; count: number }[] {
  const runs: { first: number; count: number }[] = [];
  for (const index of indices) {
    const last = runs.at(-1);
    if (last && last.first + last.count === index && last.count < maxRun) last.count++;
    else runs.push({ first: index, count: 1 });
  }
  return runs;
}

/**
 * The stream records of the memory image's pages `indices` (sorted) as they are now: `read` gives
 * `count` pages from page `first`. A page the base had and the rebuild zeroed travels as a zero
 * page: QEMU's RAM holds the base's version already.
 */
export function pageRecords(indices: readonly number[], read: (first: number, count: number) => Buffer, locator: RamPageLocator, maxRun = 256): MigrationRecord[] {
  const records: MigrationRecord[] = [];
  for (const run of pageRuns(indices, maxRun)) {
    const data = read(run.first, run.count);
    for (let i = 0; i < run.count; i++) {
      const { block, offset } = locator.locate(run.first + i);
      const page = data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
      records.push(isZeroPage(page) ? { kind: 'ram-zero', block, offset, fill: 0 } : { kind: 'ram-page', block, offset, data: page });
    }
  }
  return records;
}

/** A command line as a shell would split it: words, '...' and "..." quoting, backslash escapes. */
export function splitCommandLine(text: string): string[] {
  const words: string[] = [];
  /** the word being read; undefined between words (an empty quoted word is still a word) */
  let word: string | undefined;
  let quote: "'" | '"' | undefined;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quote === "'") {
      if (c === "'") quote = undefined;
      else word = `${word ?? ''}${c}`;
    } else if (quote === '"') {
      if (c === '"') quote = undefined;
      else if (c === '\\' && i + 1 < text.length && '"\\$`'.includes(text[i + 1]!)) word = `${word ?? ''}${text[++i]}`;
      else word = `${word ?? ''}${c}`;
    } else if (/\s/.test(c)) {
      if (word !== undefined) words.push(word);
      word = undefined;
    } else if (c === "'" || c === '"') {
      quote = c;
      word ??= '';
    } else if (c === '\\' && i + 1 < text.length) {
      word = `${word ?? ''}${text[++i]}`;
    } else word = `${word ?? ''}${c}`;
  }
  if (quote) throw new Error(`unclosed ${quote} in the command line`);
  if (word !== undefined) words.push(word);
  return words;
}
