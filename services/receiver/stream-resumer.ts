/**
 * The destination's VM when the source sends its own machine (RAM from QEMU's migration stream):
 * QEMU started at the hello on the source's command line (see stream-resume.ts) with `-incoming`,
 * and fed a migration stream as the rebuild goes: the base's configuration and RAM at once, then
 * the memory pages the rebuild writes, and after verification the last pages, the device state
 * and EOF. Loading the whole RAM is then no downtime; only the last round and the devices are.
 * `cont` comes with the source's go, as for the shared-file VM (resume.ts).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, readSync, rmSync, statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { stopProcess } from '../../shared/actor/child.js';
import { decodePatch } from '../../shared/codecs/patch.js';
import { PAGE_SIZE } from '../../shared/image/pages.js';
import { errorMessage } from '../../shared/model/errors.js';
import type { SourceMachine } from '../../shared/model/migration.js';
import type { Logger } from '../../shared/telemetry/log.js';
import type { BaseFolder } from '../../shared/vm/base-manifest.js';
import { MigrationStreamParser, type MigrationRecord } from '../../shared/vm/migration-stream.js';
import { MigrationStreamWriter } from '../../shared/vm/migration-stream-writer.js';
import { QmpClient } from '../../shared/vm/qmp.js';
import { readRamImagePages } from '../../shared/vm/ram-image.js';
import type { DestinationVm, ResumedVm } from './resume.js';
import { MAX_SOCKET_PATH_BYTES, RamPageLocator, WrittenPages, destinationCommand, pageRecords, type DestinationCommand, type HostFiles } from './stream-resume.js';

/** What a destination needs to resume machines from the stream: the base, and maybe the operator's command line. */
export interface StreamResumeOptions {
  base: BaseFolder;
  /** the destination's command line (program first) instead of the source's with local paths */
  qemuCommand?: string[];
}

/** The memory pages the rebuild writes, and how to make them readable from the rebuilt file. */
export interface RebuildWrites {
  written: WrittenPages;
  /** writes what the rebuild gathered (the file then holds every page marked) */
  flush(): void;
}

/** What the feeding took, for the logs and tests. */
export interface FeedFigures {
  /** non-zero base pages fed at the start */
  basePages: number;
  /** pages the rebuild wrote, fed while it went on (a page written twice is fed twice) */
  rebuiltPages: number;
  /** stream bytes fed before the final round's */
  bytesBeforeFinal: number;
  /** the final round's pages and stream bytes (pages, device state, EOF) */
  finalPages: number;
  finalBytes: number;
  /** from the device state's arrival to QEMU's `completed` */
  finalMs: number;
}

export const nodeHostFiles: HostFiles = {
  exists: (path) => existsSync(path),
  isDirectory: (path) => {
    try {
      return statSync(path).isDirectory();
    } catch {
      return false;
    }
  },
};

/** pages per PART section fed while the rebuild runs */
const BATCH_PAGES = 1024;
/** how long the feeder waits when the rebuild wrote nothing new */
const IDLE_MS = 50;
/** how long QEMU may take to listen for its incoming stream */
const LISTEN_TIMEOUT_MS = 10_000;
/** what of QEMU's stderr a reason quotes */
const QEMU_ERROR_CHARS = 1000;

/** the device state's records that follow the RAM (its header and configuration came from the base) */
const DEVICE_KINDS = new Set<MigrationRecord['kind']>(['device-section', 'command', 'eof', 'vm-description']);

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function parseStream(bytes: Buffer, what: string): MigrationRecord[] {
  const parser = new MigrationStreamParser();
  try {
    return [...parser.push(bytes), ...parser.end()];
  } catch (err) {
    throw new Error(`${what}: ${errorMessage(err)}`);
  }
}

async function connectIncoming(path: string, exited: () => boolean): Promise<Socket> {
  const deadline = Date.now() + LISTEN_TIMEOUT_MS;
  for (;;) {
    const socket = await new Promise<Socket | undefined>((resolve) => {
      const s = connect(path);
      s.once('connect', () => resolve(s));
      s.once('error', () => resolve(undefined));
    });
    if (socket) return socket;
    if (exited()) throw new Error('QEMU exited before it listened for the incoming migration');
    if (Date.now() > deadline) throw new Error(`QEMU did not listen for the incoming migration on ${path} within ${LISTEN_TIMEOUT_MS / 1000} s`);
    await sleep(20);
  }
}

export class StreamResumer implements DestinationVm {
  private readonly writer = new MigrationStreamWriter();
  private readonly locator: RamPageLocator;
  private readonly memoryFd: number;
  private feeding: Promise<void> = Promise.resolve();
  private finalRequested = false;
  private wake: (() => void) | undefined;
  /** QEMU's reason once something failed (explained with its own words, which may take a moment) */
  private failing: Promise<string> | undefined;
  private settled = false;
  private resumedAtMs: number | undefined;
  private bytesFed = 0;
  private memoryClosed = false;
  readonly figures: FeedFigures = { basePages: 0, rebuiltPages: 0, bytesBeforeFinal: 0, finalPages: 0, finalBytes: 0, finalMs: 0 };

  private constructor(
    private readonly child: ChildProcess,
    private readonly qmp: QmpClient,
    private readonly socket: Socket,
    private readonly command: DestinationCommand,
    private readonly errorLog: string,
    private readonly base: BaseFolder,
    /** the base's device state: its header and configuration open the stream, the final state is patched against it */
    private readonly baseDeviceState: Buffer,
    private readonly memoryImage: string,
    private readonly rebuild: RebuildWrites,
    private readonly log: Logger,
    private readonly onFailure: (reason: string) => void,
  ) {
    this.locator = new RamPageLocator(base.manifest.ramBlocks);
    this.memoryFd = openSync(memoryImage, 'r');
    socket.on('error', (err) => void this.fail(err));
    child.once('exit', (code, signal) => {
      if (!this.settled) void this.fail(new Error(`QEMU exited (${code ?? signal})`));
    });
  }

  /**
   * Starts the destination's QEMU on `machine` (the source's; checked at the hello) and begins
   * feeding it. `images` are the files being rebuilt; `onFailure` hears QEMU's reason if it fails
   * while the rebuild goes on.
   */
  static async prepare(
    machine: SourceMachine,
    options: StreamResumeOptions,
    images: { memory: string; disk: string },
    dir: string,
    rebuild: RebuildWrites,
    log: Logger,
    onFailure: (reason: string) => void,
  ): Promise<StreamResumer> {
    const disk = options.base.manifest.disks[0];
    if (!disk) throw new Error(`the base ${options.base.dir} has no disk`);
    const command = destinationCommand(options.qemuCommand ?? machine.argv, disk.drive, { dir, disk: images.disk }, nodeHostFiles);
    if (command.problems.length) throw new Error(`the destination's QEMU cannot run here: ${command.problems.join('; ')}`);
    const baseDeviceState = await readFile(options.base.deviceStatePath);
    const errorLog = join(dir, 'qemu-errors.log');
    const incoming = join(dir, 'incoming.sock');
    if (Buffer.byteLength(incoming) > MAX_SOCKET_PATH_BYTES) throw new Error(`the socket ${incoming} is longer than a unix socket's path may be (${MAX_SOCKET_PATH_BYTES} bytes): give a shorter --out`);
    rmSync(incoming, { force: true });
    rmSync(command.qmpSocket, { force: true });
    const err = openSync(errorLog, 'a');
    // detached: the VM outlives this receiver; what QEMU says goes to the error log
    const child = spawn(command.argv[0]!, command.argv.slice(1), { stdio: ['ignore', err, err], detached: true });
    closeSync(err);
    child.unref();
    const qemuSaid = (): string => (existsSync(errorLog) ? readFileSync(errorLog, 'utf8').trim().slice(-QEMU_ERROR_CHARS) : '');
    const exited = new Promise<never>((_, reject) => child.once('exit', (code, signal) => reject(new Error(`QEMU exited (${code ?? signal}) before its QMP answered: ${qemuSaid()}`))));
    exited.catch(() => undefined);
    let qmp: QmpClient | undefined;
    try {
      qmp = await Promise.race([QmpClient.connect(command.qmpSocket), exited]);
      await qmp.execute('migrate-incoming', { uri: `unix:${incoming}` });
      const socket = await Promise.race([connectIncoming(incoming, () => child.exitCode !== null || child.signalCode !== null), exited]);
      log.info('destination VM started on the source machine, fed from the base', { pid: child.pid });
      const resumer = new StreamResumer(child, qmp, socket, command, errorLog, options.base, baseDeviceState, images.memory, rebuild, log, onFailure);
      resumer.feeding = resumer.feed();
      return resumer;
    } catch (e) {
      qmp?.close();
      await stopProcess(child, 2000);
      const said = qemuSaid();
      throw new Error(said && !errorMessage(e).includes(said) ? `${errorMessage(e)}; QEMU: ${said}` : errorMessage(e));
    }
  }

  get info(): ResumedVm {
    return { pid: this.child.pid, qmpSocket: this.command.qmpSocket, serialLog: this.command.serialLog };
  }

  /** The argv QEMU was started with. */
  get argv(): string[] {
    return this.command.argv;
  }

  /** What QEMU wrote on stderr (its last lines). */
  private qemuSaid(): string {
    try {
      return readFileSync(this.errorLog, 'utf8').trim().slice(-QEMU_ERROR_CHARS);
    } catch {
      return '';
    }
  }

  /** `err` with QEMU's own words, once QEMU has said them (it exits on a stream it cannot load). */
  private async explain(err: unknown): Promise<string> {
    const deadline = Date.now() + 1500;
    while (this.child.exitCode === null && this.child.signalCode === null && Date.now() < deadline) await sleep(20);
    const said = this.qemuSaid();
    return said ? `destination QEMU: ${said} (${errorMessage(err)})` : `destination QEMU: ${errorMessage(err)}`;
  }

  private fail(err: unknown): Promise<string> {
    if (this.failing || this.settled) return this.failing ?? Promise.resolve(errorMessage(err));
    this.wake?.();
    this.failing = this.explain(err).then((reason) => {
      this.log.error('destination VM failed', { reason });
      this.onFailure(reason);
      return reason;
    });
    return this.failing;
  }

  private send(data: Buffer): Promise<void> {
    if (this.failing) return Promise.reject(new Error('the destination QEMU failed'));
    this.bytesFed += data.byteLength;
    return new Promise((resolve, reject) => {
      const s = this.socket;
      if (s.destroyed) return reject(new Error('the incoming migration socket is closed'));
      const done = (err?: Error | null): void => (err ? reject(err) : resolve());
      if (s.write(data)) return done();
      const onDrain = (): void => {
        s.off('close', onClose);
        done();
      };
      const onClose = (): void => {
        s.off('drain', onDrain);
        done(new Error('the incoming migration socket closed'));
      };
      s.once('drain', onDrain);
      s.once('close', onClose);
    });
  }

  private encode(records: MigrationRecord[]): Buffer {
    return Buffer.concat(records.map((r) => this.writer.encode(r)));
  }

  private section(phase: 'part' | 'end', pages: MigrationRecord[]): Buffer {
    const { sectionId } = this.base.manifest.ramSection;
    return this.encode([{ kind: 'ram-section', phase, sectionId }, ...pages, { kind: 'ram-eos', sectionId }]);
  }

  /** the memory pages written since last taken (at most `limit`), as they are in the rebuilt file */
  private takeWritten(limit?: number): MigrationRecord[] {
    this.rebuild.flush();
    const indices = this.rebuild.written.take(limit);
    return pageRecords(indices, (first, count) => {
      const buf = Buffer.allocUnsafe(count * PAGE_SIZE);
      const read = readSync(this.memoryFd, buf, 0, buf.byteLength, first * PAGE_SIZE);
      if (read !== buf.byteLength) throw new Error(`the rebuilt memory image ${this.memoryImage} ends at page ${first + Math.floor(read / PAGE_SIZE)}`);
      return buf;
    }, this.locator);
  }

  /** The stream up to the final round: header, configuration, RAM blocks, the base's pages, then the rebuild's as they come. */
  private async feed(): Promise<void> {
    try {
      const { manifest, memoryPath } = this.base;
      const head = parseStream(this.baseDeviceState, `the base's device state ${this.base.deviceStatePath}`).filter((r) => r.kind === 'header' || r.kind === 'configuration');
      const totalBytes = manifest.ramBlocks.reduce((a, b) => a + b.bytes, 0);
      const { sectionId } = manifest.ramSection;
      await this.send(
        this.encode([
          ...head,
          { kind: 'ram-section', phase: 'start', ...manifest.ramSection },
          { kind: 'ram-blocks', totalBytes, blocks: manifest.ramBlocks.map((b) => ({ idstr: b.idstr, lengthBytes: b.bytes })) },
          { kind: 'ram-eos', sectionId },
        ]),
      );
      let batch: MigrationRecord[] = [];
      for await (const page of readRamImagePages(memoryPath, { blocks: manifest.ramBlocks, bytes: manifest.memory.bytes })) {
        batch.push(page);
        this.figures.basePages++;
        if (batch.length === BATCH_PAGES) {
          await this.send(this.section('part', batch));
          batch = [];
        }
      }
      if (batch.length) await this.send(this.section('part', batch));
      this.log.info('base memory fed to the destination VM', { pages: this.figures.basePages, bytes: this.bytesFed });
      while (!this.finalRequested && !this.failing) {
        if (this.rebuild.written.count === 0) {
          await new Promise<void>((resolve) => {
            this.wake = resolve;
            setTimeout(resolve, IDLE_MS);
          });
          this.wake = undefined;
          continue;
        }
        const pages = this.takeWritten(BATCH_PAGES);
        this.figures.rebuiltPages += pages.length;
        await this.send(this.section('part', pages));
      }
    } catch (err) {
      await this.fail(err);
    }
  }

  /**
   * The final round, the images verified: the pages written since last fed, RAM's end, the
   * source's device state (patched against the base's), EOF; resolves when QEMU has loaded it all.
   */
  async load(deviceStatePatch: string): Promise<void> {
    const started = performance.now();
    this.finalRequested = true;
    this.wake?.();
    await this.feeding;
    if (this.failing) throw new Error(await this.failing);
    try {
      const state = decodePatch(Buffer.from(deviceStatePatch, 'base64'), this.baseDeviceState);
      const devices = parseStream(state, "the source's device state").filter((r) => DEVICE_KINDS.has(r.kind));
      if (!devices.some((r) => r.kind === 'eof')) throw new Error("the source's device state has no QEMU_VM_EOF");
      this.figures.bytesBeforeFinal = this.bytesFed;
      const pages = this.takeWritten();
      this.figures.finalPages = pages.length;
      await this.send(Buffer.concat([this.section('end', pages), this.encode(devices)]));
      this.figures.finalBytes = this.bytesFed - this.figures.bytesBeforeFinal;
      this.socket.end();
      await this.qmp.waitMigration(60_000);
      // loaded: the stream's socket has nothing more to say
      this.socket.removeAllListeners('error');
      this.socket.on('error', () => undefined);
      this.socket.destroy();
    } catch (err) {
      throw new Error(await (this.failing ?? this.fail(err)));
    } finally {
      this.closeMemory();
    }
    this.figures.finalMs = performance.now() - started;
    this.log.info('device state loaded: ready to resume', { ...this.figures });
  }

  /** Runs the guest (once; a repeated go gets the same answer). */
  async resume(): Promise<number> {
    if (this.resumedAtMs === undefined) {
      await this.qmp.execute('cont');
      this.settled = true;
      this.resumedAtMs = Date.now();
      this.log.info('destination VM resumed');
      this.qmp.close();
    }
    return this.resumedAtMs;
  }

  async abort(): Promise<void> {
    this.settled = true;
    this.finalRequested = true;
    this.wake?.();
    this.socket.destroy();
    await this.qmp.execute('quit').catch(() => undefined);
    this.qmp.close();
    await stopProcess(this.child, 3000);
    this.closeMemory();
  }

  private closeMemory(): void {
    if (this.memoryClosed) return;
    this.memoryClosed = true;
    closeSync(this.memoryFd);
  }
}
