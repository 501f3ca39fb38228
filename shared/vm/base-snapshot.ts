/**
 * Taking a base snapshot of a running VM, however its owner started QEMU: its RAM through QEMU's
 * own migration (QMP `migrate` to a socket this process listens on, parsed as it arrives), the
 * device state (that stream without its RAM), a copy of each disk, and the page index of the RAM
 * image, into one folder (see base-manifest.ts). The guest runs on: QEMU pauses it only for the
 * migration's last round, and `cont` follows at once.
 */
import { spawn } from 'node:child_process';
import { lstat, mkdir, mkdtemp, open, readdir, readlink, rename, rm, rmdir, stat, writeFile, type FileHandle } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { basename, dirname, join, resolve } from 'node:path';
import { loadBaseIndex } from '../image/base-index.js';
import { PAGE_SIZE } from '../image/pages.js';
import { errorMessage } from '../model/errors.js';
import {
  BASE_DEVICE_STATE_FILE,
  BASE_MANIFEST_FILE,
  BASE_MANIFEST_VERSION,
  BASE_MEMORY_FILE,
  readBase,
  readHead,
  type BaseDisk,
  type BaseManifest,
  type DiskFormat,
} from './base-manifest.js';
import { MigrationStreamParser, MigrationStreamError, type MigrationRecord } from './migration-stream.js';
import { MigrationStreamWriter } from './migration-stream-writer.js';
import { addBaseBitmap, baseBitmapName, findDriveNode } from './disk-dirty.js';
import { describeMachine, type MachineDescription, type QemuProcess } from './qemu-process.js';
import { acceptOne, eventMs, findQemuBehind, recoverFromMigration, listenForQemu, MIGRATION_ACTIVE, setMigrationCapabilities, streamCapabilitiesOff, type MigrationTarget } from './qemu-migration.js';
import { QmpClient, QmpError } from './qmp.js';
import { RamImageWriter, type RamBlockPlacement } from './ram-image.js';

export interface TakeBaseOptions {
  /** the VM's QMP socket (QEMU serves one client at a time: nothing else may be connected) */
  qmpSocket: string;
  /** the base folder to create: absent or empty */
  outDir: string;
  /** how long QEMU's migration may take before it is cancelled (default 600 s) */
  migrationTimeoutMs?: number;
  signal?: AbortSignal;
  /** progress lines */
  log?: (line: string) => void;
}

export interface BaseFileSummary {
  file: string;
  bytes: number;
  /** what the file takes on disk (it is sparse: zero pages and blocks are holes) */
  allocatedBytes: number;
}

export interface BaseSummary {
  dir: string;
  files: BaseFileSummary[];
  /** the files' sizes added up */
  bytes: number;
  /** how long the guest was paused (QEMU's STOP to RESUME); null when it was not running to begin with */
  pausedMs: number | null;
  /** the whole command, disks and index included */
  seconds: number;
  /** QEMU's migration alone, `migrate` to completion */
  migrationSeconds: number;
  /** the migration stream as QEMU sent it */
  streamBytes: number;
  ramBlocks: RamBlockPlacement[];
  contentHash: string;
}

/** Runstates a base cannot be taken from, with why. */
const REFUSED_RUNSTATES: Record<string, string> = {
  inmigrate: 'it is waiting for an incoming migration (-incoming)',
  postmigrate: 'it was migrated away and is stopped (postmigrate); `cont` it first if it is to run on',
  'finish-migrate': 'a migration is finishing',
};

/** A base that cannot be taken as asked, naming why. */
export class BaseSnapshotError extends Error {
  override name = 'BaseSnapshotError';
}

function fail(message: string): never {
  throw new BaseSnapshotError(message);
}

async function checkQemu(qmpSocket: string): Promise<{ process: QemuProcess; cwd: string; uid: number }> {
  const s = await lstat(qmpSocket).catch((err: NodeJS.ErrnoException) => fail(`no QEMU behind the QMP socket ${qmpSocket}: ${err.code === 'ENOENT' ? 'no such file' : err.code}`));
  if (!s.isSocket()) fail(`no QEMU behind the QMP socket ${qmpSocket}: it is not a socket`);
  const found = findQemuBehind(qmpSocket, (m) => new BaseSnapshotError(m));
  const exe = await readlink(`/proc/${found.pid}/exe`).catch(() => found.argv[0] ?? '');
  if (![exe, found.argv[0] ?? ''].some((p) => /qemu|kvm/i.test(basename(p)))) {
    fail(`the process behind the QMP socket ${qmpSocket} is not QEMU: pid ${found.pid}, ${basename(exe) || 'unknown program'}`);
  }
  const cwd = await readlink(`/proc/${found.pid}/cwd`);
  const uid = (await stat(`/proc/${found.pid}`)).uid;
  return { process: found, cwd, uid };
}

async function connectQmp(qmpSocket: string): Promise<QmpClient> {
  try {
    return await QmpClient.connect(qmpSocket, 2000);
  } catch (err) {
    const why = errorMessage(err);
    const hint = /greeting/.test(why) ? ' (QEMU serves one QMP client per socket: is another one, such as libvirt or a handoff, connected?)' : '';
    throw new BaseSnapshotError(`QEMU does not answer on the QMP socket ${qmpSocket}: ${why}${hint}`);
  }
}

/** The base folder must be new or empty: a base is never overwritten in place. */
async function checkOutDir(out: string): Promise<void> {
  let entries: string[];
  try {
    entries = await readdir(out);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return;
    fail(`--out ${out}: ${code === 'ENOTDIR' ? 'exists and is not a folder' : `cannot be read (${code})`}`);
  }
  if (entries.length > 0) fail(`--out ${out} is not empty (${entries.slice(0, 3).join(', ')}${entries.length > 3 ? ', ...' : ''}): a base is written into a new or empty folder`);
}

interface DiskPlan {
  drive: number;
  source: string;
  format: DiskFormat;
  file: string;
}

const QCOW2_MAGIC = 0x514649fb;

async function probeFormat(path: string): Promise<{ format: DiskFormat; backing: boolean }> {
  const head = await readHead(path, 16);
  if (head.byteLength < 16 || head.readUInt32BE(0) !== QCOW2_MAGIC) return { format: 'raw', backing: false };
  return { format: 'qcow2', backing: head.readBigUInt64BE(8) !== 0n };
}

/** The disks to copy: every drive of the command line with an image file, checked before QEMU is asked anything. */
async function planDisks(argv: readonly string[], machine: MachineDescription, cwd: string): Promise<DiskPlan[]> {
  if (argv.some((a) => a === '-blockdev' || a === '--blockdev')) fail('the VM names disks with -blockdev: a base copies the drives of -drive, -hda and the like only');
  const plans: DiskPlan[] = [];
  for (const [i, d] of machine.drives.entries()) {
    if (!d.file) continue;
    const what = `drive ${i} (if=${d.interface}${d.index === undefined ? '' : `,index=${d.index}`}, ${d.file})`;
    const source = resolve(cwd, d.file);
    const s = await stat(source).catch((err: NodeJS.ErrnoException) => fail(`${what}: cannot be read (${err.code}): a base copies image files the source can read`));
    if (!s.isFile()) fail(`${what}: not a regular file: a base copies image files only`);
    if (d.format !== undefined && d.format !== 'raw' && d.format !== 'qcow2') fail(`${what}: format ${d.format}: a base copies raw and qcow2 disks only`);
    const probed = await probeFormat(source);
    const format = (d.format as DiskFormat | undefined) ?? probed.format;
    if (format === 'qcow2' && probed.backing) fail(`${what}: a qcow2 image with a backing file is not whole by itself; flatten it (qemu-img convert) to take a base of it`);
    plans.push({ drive: i, source, format, file: `disk${i}.${format === 'qcow2' ? 'qcow2' : 'img'}` });
  }
  return plans;
}

/** A sparse copy (holes stay holes; a reflink where the file system has them). */
function copySparse(from: string, to: string): Promise<void> {
  return new Promise((resolvePromise, reject) => {
    const cp = spawn('cp', ['--sparse=always', '--reflink=auto', from, to], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    cp.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    cp.once('error', reject);
    cp.once('exit', (code) => (code === 0 ? resolvePromise() : reject(new BaseSnapshotError(`copying ${from}: cp exited with ${code}: ${stderr.trim()}`))));
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export interface StreamResult {
  streamBytes: number;
  machineType: string;
  ramSection: BaseManifest['ramSection'];
}

/**
 * Reads QEMU's migration stream as it arrives (from the socket QEMU migrates to): RAM pages into
 * the image, everything else encoded again into the device state. Reading waits for the writes, so
 * QEMU sends at the pace the disk takes.
 */
export async function receiveBaseStream(source: AsyncIterable<Buffer>, memory: RamImageWriter, deviceState: FileHandle): Promise<StreamResult> {
  const parser = new MigrationStreamParser();
  const writer = new MigrationStreamWriter();
  const result: StreamResult = { streamBytes: 0, machineType: '', ramSection: { sectionId: -1, instanceId: 0, versionId: 0 } };
  let sawEof = false;
  const take = async (r: MigrationRecord): Promise<void> => {
    switch (r.kind) {
      case 'ram-section':
        if (r.phase === 'start') result.ramSection = { sectionId: r.sectionId, instanceId: r.instanceId ?? 0, versionId: r.versionId ?? 4 };
        return;
      case 'ram-eos':
        return;
      case 'ram-blocks':
      case 'ram-page':
      case 'ram-zero':
        return memory.record(r);
      case 'configuration':
        result.machineType = r.machineType;
        if (r.targetPageBits !== undefined && 1 << r.targetPageBits !== PAGE_SIZE) {
          fail(`the VM's target pages are ${1 << r.targetPageBits} bytes: a base's RAM image is indexed in ${PAGE_SIZE}-byte pages`);
        }
        break;
      case 'eof':
        sawEof = true;
        break;
      default:
        break;
    }
    await deviceState.write(writer.encode(r));
  };
  try {
    for await (const chunk of source) {
      result.streamBytes += chunk.byteLength;
      for (const r of parser.push(chunk)) await take(r);
    }
    for (const r of parser.end()) await take(r);
  } catch (err) {
    if (err instanceof MigrationStreamError) throw new BaseSnapshotError(`QEMU's migration stream: ${err.message}`);
    throw err;
  }
  if (!sawEof) fail(`QEMU's migration stream ended after ${result.streamBytes} bytes without QEMU_VM_EOF`);
  if (!memory.placement) fail("QEMU's migration stream has no RAM block list (MEM_SIZE)");
  if (result.ramSection.sectionId < 0) fail("QEMU's migration stream has no RAM section");
  return result;
}

/** Polls query-migrate until QEMU says completed; finely once the guest is paused, since that is downtime. */
async function waitCompleted(qmp: QmpClient, timeoutMs: number, signal: AbortSignal, paused: () => boolean): Promise<{ downtimeMs?: number }> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (signal.aborted) throw signal.reason instanceof Error ? signal.reason : new BaseSnapshotError('interrupted');
    const s = await qmp.execute('query-migrate');
    if (s.status === 'completed') return s.downtime === undefined ? {} : { downtimeMs: s.downtime };
    if (s.status === 'failed' || s.status === 'cancelled') throw new QmpError(`QEMU's migration ${s.status}: ${s['error-desc'] ?? 'no reason given'}`);
    if (Date.now() > deadline) {
      fail(`QEMU's migration did not complete within ${timeoutMs / 1000} s (status ${s.status ?? 'unknown'}, ${s.ram?.transferred ?? 0} bytes sent): a guest that dirties memory faster than it is read never converges`);
    }
    await sleep(paused() ? 2 : 25);
  }
}

async function fileSummary(dir: string, file: string): Promise<BaseFileSummary> {
  const s = await stat(join(dir, file));
  return { file, bytes: s.size, allocatedBytes: s.blocks * 512 };
}

interface MigrationResult {
  stream: StreamResult;
  pausedMs: number | null;
  migrationSeconds: number;
}

/**
 * QEMU's migration into `server`'s socket, read into `memory` and `deviceState`; the guest resumed
 * at once if it ran before. On a failure the migration is cancelled, the guest left running and
 * the owner's capabilities set back.
 */
async function migrateInto(
  qmp: QmpClient,
  target: Pick<MigrationTarget, 'server' | 'socketPath'>,
  memory: RamImageWriter,
  deviceState: FileHandle,
  wasRunning: boolean,
  timeoutMs: number,
  signal: AbortSignal | undefined,
  /** runs once the migration completed, with the guest still paused, before `cont` */
  whilePaused: () => Promise<void>,
): Promise<MigrationResult> {
  // explicitly off, whatever the owner set: multifd, xbzrle, compression and postcopy would take
  // pages out of the main stream or encode them, x-ignore-shared would leave shared RAM out
  const restore = await setMigrationCapabilities(qmp, streamCapabilitiesOff());

  // the pause, on QEMU's clock: STOP when the last round begins, RESUME on cont
  const pause: { stoppedAt?: number; stoppedLocal?: number; resumedAt?: number } = {};
  const stopListening = qmp.onEvent((e) => {
    if (e.event === 'STOP') {
      pause.stoppedAt = eventMs(e);
      pause.stoppedLocal = performance.now();
    } else if (e.event === 'RESUME' && pause.stoppedLocal !== undefined) pause.resumedAt = eventMs(e);
  });
  const abort = new AbortController();
  const onOuterAbort = (): void => abort.abort(new BaseSnapshotError('interrupted'));
  signal?.addEventListener('abort', onOuterAbort, { once: true });
  const result: MigrationResult = { stream: { streamBytes: 0, machineType: '', ramSection: { sectionId: -1, instanceId: 0, versionId: 0 } }, pausedMs: null, migrationSeconds: 0 };
  const connection: { socket?: Socket; ended: boolean } = { ended: false };
  const migrateAt = performance.now();
  try {
    const accepted = acceptOne(target.server, abort.signal, () => new BaseSnapshotError('QEMU never connected to the migration socket'));
    accepted.catch(() => undefined);
    await qmp.execute('migrate', { uri: `unix:${target.socketPath}` });
    const streamed = accepted.then(async (s) => {
      connection.socket = s;
      abort.signal.addEventListener('abort', () => s.destroy(), { once: true });
      try {
        result.stream = await receiveBaseStream(s as AsyncIterable<Buffer>, memory, deviceState);
        connection.ended = true;
      } catch (err) {
        // QEMU's write fails, its migration with it, and it resumes the guest
        s.destroy();
        throw err;
      }
    });
    const completed = waitCompleted(qmp, timeoutMs, abort.signal, () => pause.stoppedLocal !== undefined || connection.ended).then(async () => {
      result.migrationSeconds = (performance.now() - migrateAt) / 1000;
      await whilePaused();
      // QEMU leaves the guest paused (postmigrate): it runs on at once
      if (!wasRunning) return;
      await qmp.execute('cont');
      // QEMU sends RESUME before its reply to cont: the pause on QEMU's own clock, else on ours
      const now = performance.now();
      result.pausedMs = pause.stoppedAt !== undefined && pause.resumedAt !== undefined ? pause.resumedAt - pause.stoppedAt : now - (pause.stoppedLocal ?? now);
    });
    try {
      await Promise.all([streamed, completed]);
    } catch (err) {
      abort.abort(err);
      await Promise.allSettled([streamed, completed]);
      throw err;
    }
    await restore();
    return result;
  } catch (err) {
    connection.socket?.destroy();
    target.server.close();
    const left = await recoverFromMigration(qmp, wasRunning, restore);
    if (left) throw new BaseSnapshotError(`${errorMessage(err)}; ${left}`);
    throw err;
  } finally {
    stopListening();
    signal?.removeEventListener('abort', onOuterAbort);
  }
}

/** Takes a base snapshot of the VM behind `qmpSocket` into `outDir`. */
export async function takeBase(options: TakeBaseOptions): Promise<BaseSummary> {
  const started = performance.now();
  const log = options.log ?? ((): void => undefined);
  const out = resolve(options.outDir);
  await checkOutDir(out);
  const qemu = await checkQemu(options.qmpSocket);
  const machine = describeMachine(qemu.process.argv);
  const disks = await planDisks(qemu.process.argv, machine, qemu.cwd);
  const qmp = await connectQmp(options.qmpSocket);
  let socketDir: string | undefined;
  let staging: string | undefined;
  let memory: RamImageWriter | undefined;
  let deviceState: FileHandle | undefined;
  try {
    const version = await qmp.execute('query-version');
    const qemuVersion = `${version.qemu.major}.${version.qemu.minor}.${version.qemu.micro}`;
    const status = await qmp.execute('query-status');
    const refused = REFUSED_RUNSTATES[status.status];
    if (refused) fail(`cannot take a base of the VM behind ${options.qmpSocket}: ${refused}`);
    const current = await qmp.execute('query-migrate');
    if (current.status && MIGRATION_ACTIVE.has(current.status)) fail(`a migration is already running on the VM behind ${options.qmpSocket} (status ${current.status}): wait for it or cancel it (QMP migrate_cancel)`);
    const parameters = await qmp.execute('query-migrate-parameters');
    if (parameters['tls-creds']) fail(`the VM's migrations are set to use TLS (tls-creds ${parameters['tls-creds']}): a base reads the plain stream; clear tls-creds first`);

    await mkdir(dirname(out), { recursive: true });
    staging = await mkdtemp(join(dirname(out), `.${basename(out)}.partial-`));
    const target = await listenForQemu(qemu.uid);
    socketDir = target.socketDir;
    memory = await RamImageWriter.create(join(staging, BASE_MEMORY_FILE));
    deviceState = await open(join(staging, BASE_DEVICE_STATE_FILE), 'wx');
    const createdAt = new Date().toISOString();
    // each disk's block node, for the bitmap that tracks the writes after the base
    const nodes = new Map<number, string>();
    for (const d of disks) {
      const node = (await findDriveNode(qmp, d.source, qemu.cwd))?.inserted?.['node-name'];
      if (node) nodes.set(d.drive, node);
      else log(`drive ${d.drive} (${d.source}): QEMU names no block node for it; its handoffs will read the whole disk`);
    }
    const bitmaps = new Map<number, string>();
    // added while the guest is paused with its RAM taken, before cont and the disks' copy: every
    // write after the RAM is tracked; the copy may hold some of them too, which only makes the
    // bitmap a superset of the pages that differ from the base's disk
    const addBitmaps = async (): Promise<void> => {
      for (const [drive, node] of nodes) {
        const name = baseBitmapName();
        try {
          await addBaseBitmap(qmp, node, name);
          bitmaps.set(drive, name);
        } catch (err) {
          log(`drive ${drive}: no dirty bitmap (${errorMessage(err)}); its handoffs will read the whole disk`);
        }
      }
    };
    log(`migrating the RAM of QEMU ${qemuVersion} (pid ${qemu.process.pid}, ${machine.memoryBytes / 2 ** 20} MiB) into ${out}`);
    const migration = await migrateInto(qmp, target, memory, deviceState, status.running, options.migrationTimeoutMs ?? 600_000, options.signal, addBitmaps);
    qmp.close();
    log(
      `RAM taken in ${migration.migrationSeconds.toFixed(2)} s (${memory.pages} pages, ${memory.zeroPages} zero pages); ` +
        (migration.pausedMs === null ? 'the guest was not running and stays so' : `the guest was paused ${Math.round(migration.pausedMs)} ms and runs on`),
    );
    await memory.close();
    const layout = memory.placement!;
    memory = undefined;
    await deviceState.close();
    deviceState = undefined;

    // the disks are copied with the guest running again: a base need only be fixed and identical at
    // every cloudlet, not consistent with its RAM (a handoff sends the disk blocks that differ from it)
    log(disks.length ? `copying ${disks.length} disk${disks.length > 1 ? 's' : ''} and indexing ${BASE_MEMORY_FILE}` : `indexing ${BASE_MEMORY_FILE}`);
    const [index] = await Promise.all([loadBaseIndex(join(staging, BASE_MEMORY_FILE)), ...disks.map((d) => copySparse(d.source, join(staging!, d.file)))]);
    if (options.signal?.aborted) fail('interrupted');
    // a raw disk's page index too, built once here and not at every cloudlet's first handoff
    for (const d of disks) if (d.format === 'raw') await loadBaseIndex(join(staging, d.file));
    if (options.signal?.aborted) fail('interrupted');
    const baseDisks: BaseDisk[] = [];
    for (const d of disks) {
      const dirtyBitmap = bitmaps.get(d.drive);
      baseDisks.push({ file: d.file, bytes: (await stat(join(staging, d.file))).size, format: d.format, drive: d.drive, sourceFile: d.source, ...(dirtyBitmap ? { dirtyBitmap } : {}) });
    }

    const manifest: BaseManifest = {
      version: BASE_MANIFEST_VERSION,
      createdAt,
      qemuVersion,
      sourceArgv: qemu.process.argv,
      machine,
      machineType: migration.stream.machineType,
      ramSection: migration.stream.ramSection,
      ramBlocks: layout.blocks,
      memory: { file: BASE_MEMORY_FILE, bytes: layout.bytes, contentHash: index.contentHash },
      disks: baseDisks,
      deviceState: { file: BASE_DEVICE_STATE_FILE, bytes: (await stat(join(staging, BASE_DEVICE_STATE_FILE))).size },
    };
    await writeFile(join(staging, BASE_MANIFEST_FILE), `${JSON.stringify(manifest, null, 1)}\n`);
    await readBase(staging);
    // an empty --out is replaced by the finished folder (a rename keeps the index's file stamps)
    await rmdir(out).catch((err: NodeJS.ErrnoException) => (err.code === 'ENOENT' ? undefined : Promise.reject(err)));
    await rename(staging, out);
    staging = undefined;

    const names = [BASE_MANIFEST_FILE, BASE_MEMORY_FILE, `${BASE_MEMORY_FILE}.hidx`, BASE_DEVICE_STATE_FILE, ...baseDisks.flatMap((d) => (d.format === 'raw' ? [d.file, `${d.file}.hidx`] : [d.file]))];
    const files = (await Promise.all(names.map((f) => fileSummary(out, f).catch(() => undefined)))).filter((f): f is BaseFileSummary => f !== undefined);
    return {
      dir: out,
      files,
      bytes: files.reduce((a, f) => a + f.bytes, 0),
      pausedMs: migration.pausedMs === null ? null : Math.round(migration.pausedMs * 10) / 10,
      seconds: (performance.now() - started) / 1000,
      migrationSeconds: migration.migrationSeconds,
      streamBytes: migration.stream.streamBytes,
      ramBlocks: layout.blocks,
      contentHash: index.contentHash,
    };
  } finally {
    qmp.close();
    await memory?.abandon();
    await deviceState?.close().catch(() => undefined);
    if (socketDir) await rm(socketDir, { recursive: true, force: true });
    if (staging) await rm(staging, { recursive: true, force: true });
  }
}
