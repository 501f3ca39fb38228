/**
 * A base snapshot's folder, as every cloudlet holds it: base.json (this manifest), memory.img (the
 * RAM image, see ram-image.ts) with its page index memory.img.hidx, device-state.bin (the migration
 * stream without its RAM) and a copy of each disk. `readBase` checks a folder against its manifest
 * before anything relies on it.
 */
import { open, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { PAGE_SIZE } from '../image/pages.js';
import { QEMU_VM_FILE_MAGIC } from './migration-stream.js';
import type { MachineDescription } from './qemu-process.js';
import type { RamBlockPlacement } from './ram-image.js';

export const BASE_MANIFEST_VERSION = 1;
export const BASE_MANIFEST_FILE = 'base.json';
export const BASE_MEMORY_FILE = 'memory.img';
export const BASE_DEVICE_STATE_FILE = 'device-state.bin';

export type DiskFormat = 'raw' | 'qcow2';

export interface BaseDisk {
  /** in the base folder */
  file: string;
  bytes: number;
  format: DiskFormat;
  /** which drive it is: its position in `machine.drives` */
  drive: number;
  /** the image the source QEMU uses (a path on the source's host) */
  sourceFile: string;
  /**
   * the source QEMU's non-persistent dirty bitmap on the drive, added when the base was taken: a
   * handoff reads the pages written since from it (absent, or gone after QEMU restarted: the whole disk)
   */
  dirtyBitmap?: string;
}

export interface BaseManifest {
  version: typeof BASE_MANIFEST_VERSION;
  /** ISO 8601, when the RAM was taken */
  createdAt: string;
  /** as QMP query-version gives it, e.g. 7.2.22 */
  qemuVersion: string;
  /** the source QEMU's command line, program first */
  sourceArgv: string[];
  machine: MachineDescription;
  /** the machine type the stream names (the alias resolved) */
  machineType: string;
  /** the RAM section's header as the source sent it: a rebuilt stream opens RAM with the same */
  ramSection: { sectionId: number; instanceId: number; versionId: number };
  /** the stream's MEM_SIZE list, in order, with where each block sits in memory.img */
  ramBlocks: RamBlockPlacement[];
  memory: { file: string; bytes: number; contentHash: string };
  disks: BaseDisk[];
  deviceState: { file: string; bytes: number };
}

/** A base folder that cannot be used as it is; the message names the file and the problem. */
export class BadBaseError extends Error {
  override name = 'BadBaseError';
}

export interface BaseFolder {
  dir: string;
  manifest: BaseManifest;
  memoryPath: string;
  deviceStatePath: string;
  diskPaths: string[];
}

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Checks the shape of a parsed base.json, naming the first field that is wrong. */
export function checkManifest(v: unknown, where: string): BaseManifest {
  const bad = (field: string, problem: string): never => {
    throw new BadBaseError(`${where}: ${field} ${problem}`);
  };
  const str = (o: Json, k: string, at: string): string => (typeof o[k] === 'string' && o[k] !== '' ? (o[k] as string) : bad(`${at}${k}`, 'must be a non-empty string'));
  const count = (o: Json, k: string, at: string): number => (Number.isSafeInteger(o[k]) && (o[k] as number) >= 0 ? (o[k] as number) : bad(`${at}${k}`, 'must be a whole number of at least 0'));
  const obj = (o: Json, k: string): Json => (isObject(o[k]) ? o[k] : bad(k, 'must be an object'));
  const list = (o: Json, k: string): unknown[] => (Array.isArray(o[k]) ? (o[k] as unknown[]) : bad(k, 'must be a list'));
  if (!isObject(v)) return bad('the manifest', 'is not a JSON object');
  if (v.version !== BASE_MANIFEST_VERSION) bad('version', `is ${JSON.stringify(v.version)}; this handoff reads version ${BASE_MANIFEST_VERSION}`);
  str(v, 'createdAt', '');
  if (Number.isNaN(Date.parse(v.createdAt as string))) bad('createdAt', 'is not a date');
  str(v, 'qemuVersion', '');
  str(v, 'machineType', '');
  const argv = list(v, 'sourceArgv');
  if (argv.length === 0 || !argv.every((a) => typeof a === 'string')) bad('sourceArgv', 'must be a non-empty list of strings');
  const machine = obj(v, 'machine');
  str(machine, 'machineType', 'machine.');
  count(machine, 'memoryBytes', 'machine.');
  if (!Array.isArray(machine.drives) || !Array.isArray(machine.devices)) bad('machine', 'must have drives and devices lists');
  const section = obj(v, 'ramSection');
  for (const k of ['sectionId', 'instanceId', 'versionId']) count(section, k, 'ramSection.');
  const memory = obj(v, 'memory');
  str(memory, 'file', 'memory.');
  const memoryBytes = count(memory, 'bytes', 'memory.');
  if (!/^[0-9a-f]{64}$/.test(String(memory.contentHash))) bad('memory.contentHash', 'must be 64 hex digits (SHA-256)');
  const blocks = list(v, 'ramBlocks');
  if (blocks.length === 0) bad('ramBlocks', 'is empty');
  let end = 0;
  blocks.forEach((b, i) => {
    const at = `ramBlocks[${i}].`;
    if (!isObject(b)) return bad(`ramBlocks[${i}]`, 'must be an object');
    str(b, 'idstr', at);
    const bytes = count(b, 'bytes', at);
    const offset = count(b, 'offset', at);
    if (offset % PAGE_SIZE !== 0) bad(`${at}offset`, `${offset} is not a multiple of ${PAGE_SIZE}`);
    if (offset < end) bad(`${at}offset`, `${offset} overlaps the block before it (which ends at ${end})`);
    end = offset + bytes;
  });
  if (end > memoryBytes) bad('ramBlocks', `end at byte ${end}, beyond memory.bytes ${memoryBytes}`);
  list(v, 'disks').forEach((d, i) => {
    const at = `disks[${i}].`;
    if (!isObject(d)) return bad(`disks[${i}]`, 'must be an object');
    str(d, 'file', at);
    str(d, 'sourceFile', at);
    count(d, 'bytes', at);
    count(d, 'drive', at);
    if (d.format !== 'raw' && d.format !== 'qcow2') bad(`${at}format`, `is ${JSON.stringify(d.format)}, not raw or qcow2`);
    if (d.dirtyBitmap !== undefined) str(d, 'dirtyBitmap', at);
  });
  const deviceState = obj(v, 'deviceState');
  str(deviceState, 'file', 'deviceState.');
  count(deviceState, 'bytes', 'deviceState.');
  return v as unknown as BaseManifest;
}

/** The first `bytes` bytes of a file (fewer if it is shorter): enough to tell its format. */
export async function readHead(path: string, bytes: number): Promise<Buffer> {
  const head = Buffer.alloc(bytes);
  const fh = await open(path, 'r');
  try {
    const { bytesRead } = await fh.read(head, 0, bytes, 0);
    return head.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** A file of the folder: present, a regular file, of the size the manifest says. */
async function checkFile(dir: string, file: string, bytes: number, what: string): Promise<string> {
  if (file.includes('/') || file === '..' || file === '.') throw new BadBaseError(`base ${dir}: ${what} "${file}" must be a file name inside the folder`);
  const path = join(dir, file);
  let size: number;
  try {
    const s = await stat(path);
    if (!s.isFile()) throw new BadBaseError(`base ${dir}: ${what} ${file} is not a regular file`);
    size = s.size;
  } catch (err) {
    if (err instanceof BadBaseError) throw err;
    throw new BadBaseError(`base ${dir}: ${what} ${file} is missing (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
  if (size !== bytes) throw new BadBaseError(`base ${dir}: ${what} ${file} is ${size} bytes, base.json says ${bytes} (changed or truncated?)`);
  return path;
}

/** The base snapshot in `dir`, its manifest validated and every file it names checked. */
export async function readBase(dir: string): Promise<BaseFolder> {
  const manifestPath = join(dir, BASE_MANIFEST_FILE);
  let text: string;
  try {
    text = await readFile(manifestPath, 'utf8');
  } catch (err) {
    throw new BadBaseError(`base ${dir}: ${BASE_MANIFEST_FILE} cannot be read (${(err as NodeJS.ErrnoException).code ?? String(err)}): is this a folder made by 'handoff base'?`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new BadBaseError(`base ${dir}: ${BASE_MANIFEST_FILE} is not JSON: ${(err as Error).message}`);
  }
  const manifest = checkManifest(parsed, `base ${dir}: ${BASE_MANIFEST_FILE}`);
  const memoryPath = await checkFile(dir, manifest.memory.file, manifest.memory.bytes, 'memory image');
  if (manifest.memory.bytes % PAGE_SIZE !== 0) throw new BadBaseError(`base ${dir}: memory image ${manifest.memory.file} is ${manifest.memory.bytes} bytes, not whole ${PAGE_SIZE}-byte pages`);
  const deviceStatePath = await checkFile(dir, manifest.deviceState.file, manifest.deviceState.bytes, 'device state');
  const head = await readHead(deviceStatePath, 4);
  if (head.byteLength < 4 || head.readUInt32BE(0) !== QEMU_VM_FILE_MAGIC) throw new BadBaseError(`base ${dir}: device state ${manifest.deviceState.file} does not begin with QEMU's migration magic QEVM`);
  const diskPaths: string[] = [];
  for (const [i, d] of manifest.disks.entries()) diskPaths.push(await checkFile(dir, d.file, d.bytes, `disk ${i}`));
  return { dir, manifest, memoryPath, deviceStatePath, diskPaths };
}
