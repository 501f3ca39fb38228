/**
 * A real QEMU's own migration stream, read record by record and rebuilt into a second QEMU: the test
 * guest with ordinary RAM, QEMU's default devices and a NIC, as a user starts a VM. The destination's
 * command line is the source's, read from the process behind its QMP socket. The destination runs on
 * from the source's counter without a reboot, and its memory before `cont` equals the source's at stop.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { GUEST_CACHE } from '../load/lib/vm.js';
import { stopProcess } from '../shared/actor/child.js';
import { buildGuest } from '../shared/testdata/guest.js';
import { MigrationStreamParser, type MigrationRecord, type RamBlockInfo } from '../shared/vm/migration-stream.js';
import { MigrationStreamWriter } from '../shared/vm/migration-stream-writer.js';
import { accelerator, lastCounter, QEMU_BIN } from '../shared/vm/qemu.js';
import { compareMachines, describeMachine, findQemuByQmpSocket, resolveMachineType } from '../shared/vm/qemu-process.js';
import { QmpClient } from '../shared/vm/qmp.js';
import { qemuMemoryHash } from './helpers/guest-memory.js';
import { connectWhenListening, waitFor } from './helpers/user-vm.js';

const hasQemu = spawnSync(QEMU_BIN, ['--version']).status === 0;
const MEMORY_BYTES = 256 << 20;

interface Qemu {
  child: ChildProcess;
  qmp: QmpClient;
  serialLog: string;
  stderr: () => string;
}

async function startQemu(argv: string[], qmpSocket: string, serialLog: string): Promise<Qemu> {
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<never>((_, reject) => child.once('exit', (code, signal) => reject(new Error(`QEMU exited (${code ?? signal}): ${stderr.trim()}`))));
  exited.catch(() => undefined);
  try {
    const qmp = await Promise.race([QmpClient.connect(qmpSocket, 30_000), exited]);
    return { child, qmp, serialLog, stderr: () => stderr.trim() };
  } catch (err) {
    await stopProcess(child, 2000);
    throw err;
  }
}

function withTimeout<T>(what: string, timeoutMs: number, promise: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} within ${timeoutMs / 1000} s`)), timeoutMs)));
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}



interface StreamFigures {
  bytes: number;
  rebuiltBytes: number;
  identical: boolean;
  pages: number;
  zeroPages: number;
  ramSections: number;
  blocks: RamBlockInfo[];
  deviceSections: number;
  deviceSectionBytes: number;
  machineType: string;
  descriptionBytes: number;
  seconds: number;
}

/**
 * Accepts the source's migration connection on `server`, parses it and writes the rebuilt stream to
 * `destination`, at the pace the destination reads (the source is paused while the destination's
 * socket is full).
 */
function relay(server: ReturnType<typeof createServer>, destination: Socket): Promise<StreamFigures> {
  const parser = new MigrationStreamParser();
  const writer = new MigrationStreamWriter();
  const hashIn = createHash('sha256');
  const hashOut = createHash('sha256');
  const figures: StreamFigures = { bytes: 0, rebuiltBytes: 0, identical: false, pages: 0, zeroPages: 0, ramSections: 0, blocks: [], deviceSections: 0, deviceSectionBytes: 0, machineType: '', descriptionBytes: 0, seconds: 0 };
  const started = Date.now();
  const count = (r: MigrationRecord): void => {
    if (r.kind === 'ram-page') figures.pages++;
    else if (r.kind === 'ram-zero') figures.zeroPages++;
    else if (r.kind === 'ram-section') figures.ramSections++;
    else if (r.kind === 'ram-blocks') figures.blocks = r.blocks;
    else if (r.kind === 'device-section') {
      figures.deviceSections++;
      figures.deviceSectionBytes += r.bytes.byteLength;
    } else if (r.kind === 'configuration') figures.machineType = r.machineType;
    else if (r.kind === 'vm-description') figures.descriptionBytes = Buffer.byteLength(r.json);
  };
  const forward = (records: MigrationRecord[]): boolean => {
    records.forEach(count);
    const out = Buffer.concat(records.map((r) => writer.encode(r)));
    figures.rebuiltBytes += out.byteLength;
    hashOut.update(out);
    return destination.write(out);
  };
  return new Promise((resolve, reject) => {
    destination.once('error', reject);
    server.once('connection', (source: Socket) => {
      source.on('error', reject);
      source.on('data', (chunk: Buffer) => {
        figures.bytes += chunk.byteLength;
        hashIn.update(chunk);
        try {
          if (!forward(parser.push(chunk))) {
            source.pause();
            destination.once('drain', () => source.resume());
          }
        } catch (err) {
          reject(err);
          source.destroy();
        }
      });
      source.on('end', () => {
        try {
          forward(parser.end());
        } catch (err) {
          reject(err);
          return;
        }
        destination.end();
        figures.seconds = (Date.now() - started) / 1000;
        figures.identical = hashIn.digest('hex') === hashOut.digest('hex');
        resolve(figures);
      });
    });
  });
}

describe("a real QEMU's migration stream, parsed and rebuilt", { timeout: 600_000, skip: hasQemu ? false : `${QEMU_BIN} is not installed` }, () => {
  let dir: string;
  const started: Qemu[] = [];
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'qemu-stream-'));
  });
  after(async () => {
    for (const q of started) {
      await q.qmp.execute('quit').catch(() => undefined);
      q.qmp.close();
      await stopProcess(q.child, 3000);
    }
    await rm(dir, { recursive: true, force: true });
  });

  test('ordinary RAM, default devices, a NIC: the destination runs on from the source memory', async () => {
    const guest = buildGuest(GUEST_CACHE);
    const src = { qmp: join(dir, 'src.qmp'), serial: join(dir, 'src-serial.log') };
    const dst = { qmp: join(dir, 'dst.qmp'), serial: join(dir, 'dst-serial.log'), incoming: join(dir, 'dst-incoming.sock') };
    const outgoing = join(dir, 'src-outgoing.sock');
    // the command line a user writes: QEMU's default devices, ordinary RAM, a virtio NIC
    const sourceArgv = [
      ...[QEMU_BIN, '-machine', `pc,accel=${accelerator()}`, '-m', '256M', '-smp', '1', '-display', 'none', '-no-reboot'],
      ...['-kernel', guest.kernel, '-initrd', guest.initrd, '-append', 'console=ttyS0 quiet panic=-1'],
      ...['-nic', 'user,model=virtio-net-pci'],
      ...['-chardev', `file,id=serial0,path=${src.serial}`, '-serial', 'chardev:serial0'],
      ...['-qmp', `unix:${src.qmp},server=on,wait=off`],
    ];
    const source = await startQemu(sourceArgv, src.qmp, src.serial);
    started.push(source);
    await waitFor(`the source guest printed no counter 3 (${source.stderr()})`, 180_000, () => (lastCounter(src.serial) >= 3 ? true : undefined));

    // the destination's command line is the source's, read from the QEMU behind its QMP socket
    const found = findQemuByQmpSocket(src.qmp);
    assert.equal(found.pid, source.child.pid);
    assert.deepEqual(found.argv, sourceArgv);
    const destinationArgv = [...found.argv.map((a) => a.replace(src.qmp, dst.qmp).replace(src.serial, dst.serial)), '-S', '-incoming', 'defer'];
    assert.deepEqual(compareMachines(describeMachine(found.argv), describeMachine(destinationArgv)), []);
    const destination = await startQemu(destinationArgv, dst.qmp, dst.serial);
    started.push(destination);
    await destination.qmp.execute('migrate-incoming', { uri: `unix:${dst.incoming}` });
    const toDestination = await connectWhenListening(dst.incoming, 10_000);

    const server = createServer();
    await new Promise<void>((resolve) => server.listen(outgoing, resolve));
    try {
      const relayed = relay(server, toDestination);
      relayed.catch(() => undefined);
      await source.qmp.execute('migrate', { uri: `unix:${outgoing}` });
      await source.qmp.waitMigration(300_000);
      const figures = await withTimeout('the relay did not finish', 60_000, relayed);
      await destination.qmp.waitMigration(60_000);
      const stoppedAt = lastCounter(src.serial);
      process.stderr.write(
        `QEMU stream: ${figures.bytes} bytes (rebuilt ${figures.rebuiltBytes}, ${figures.identical ? 'byte-identical' : 'different bytes'}) in ${figures.seconds.toFixed(2)} s; ` +
          `machine ${figures.machineType}; ${figures.pages} pages, ${figures.zeroPages} zero pages in ${figures.ramSections} RAM sections; ` +
          `${figures.deviceSections} device sections, ${figures.deviceSectionBytes} bytes; VM description ${figures.descriptionBytes} bytes; ` +
          `RAM blocks ${figures.blocks.map((b) => `${b.idstr}=${b.lengthBytes}`).join(' ')}\n`,
      );

      const blocks = figures.blocks.map((b) => b.idstr);
      assert.ok(blocks.includes('pc.ram'), `no pc.ram among ${blocks.join(', ')}`);
      assert.ok(blocks.some((b) => b.endsWith('/vga.vram')), `no vga.vram among ${blocks.join(', ')}`);
      assert.equal(figures.blocks.find((b) => b.idstr === 'pc.ram')?.lengthBytes, MEMORY_BYTES);
      assert.ok(figures.pages > 0 && figures.zeroPages > 0);
      assert.ok(figures.deviceSections > 0);
      // what the command line says is what QEMU sent: the alias resolved, the RAM size
      const described = describeMachine(found.argv);
      assert.equal(figures.machineType, resolveMachineType(described.machineType));
      assert.equal(figures.blocks.find((b) => b.idstr === 'pc.ram')?.lengthBytes, described.memoryBytes);

      // the source is stopped; the destination has loaded but not run (-S)
      assert.equal((await source.qmp.execute('query-status')).status, 'postmigrate');
      assert.notEqual((await destination.qmp.execute('query-status')).running, true);
      const sourceMemory = await qemuMemoryHash(source.qmp, dir, MEMORY_BYTES);
      const destinationMemory = await qemuMemoryHash(destination.qmp, dir, MEMORY_BYTES);
      assert.equal(destinationMemory, sourceMemory, "the destination's memory before cont differs from the source's at stop");

      await destination.qmp.execute('cont');
      const reached = await waitFor(`the destination guest did not count past ${stoppedAt + 3} (${destination.stderr()})`, 60_000, () => {
        const c = lastCounter(dst.serial);
        return c > stoppedAt + 3 ? c : undefined;
      });
      const serial = readFileSync(dst.serial, 'utf8');
      const firstAtDestination = Number(/handoff-counter (\d+)/.exec(serial)?.[1] ?? 0);
      // the next counter, or the one after if the stop cut a line; a reboot would start again at 1
      assert.ok(firstAtDestination === stoppedAt + 1 || firstAtDestination === stoppedAt + 2, `the destination's first counter is ${firstAtDestination}, the source stopped at ${stoppedAt}`);
      assert.doesNotMatch(serial, /Linux version|Booting/, 'the destination guest booted again');
      assert.ok(reached > stoppedAt);
      assert.equal(lastCounter(src.serial), stoppedAt, 'the source guest ran after the stop');
    } finally {
      server.close();
      toDestination.destroy();
    }
  });
});
