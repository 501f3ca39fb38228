/**
 * `handoff base` on a real QEMU started as a user starts one (ordinary RAM, default devices, a NIC,
 * a raw disk): the folder is valid, the guest runs on, and the base resumes: a stream rebuilt from
 * memory.img and device-state.bin alone starts a second QEMU on the source's command line, whose
 * guest counts on from where the base was taken, without booting again.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createReadStream, readFileSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, open, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { GUEST_CACHE } from '../load/lib/vm.js';
import { loadBaseIndex } from '../shared/image/base-index.js';
import { buildGuest } from '../shared/testdata/guest.js';
import { readBase, type BaseFolder, type BaseManifest } from '../shared/vm/base-manifest.js';
import { receiveBaseStream, type BaseSummary } from '../shared/vm/base-snapshot.js';
import { parseMigrationStream, type MigrationRecord } from '../shared/vm/migration-stream.js';
import { MigrationStreamWriter } from '../shared/vm/migration-stream-writer.js';
import { QEMU_BIN } from '../shared/vm/qemu.js';
import { describeMachine } from '../shared/vm/qemu-process.js';
import { RamImageWriter, ramLayout, readRamImagePages } from '../shared/vm/ram-image.js';
import { imageMemoryHash, qemuMemoryHash } from './helpers/guest-memory.js';
import { connectWhenListening, startUserVm, userVmArgv, waitFor, writeEmptyQcow2, type UserVm } from './helpers/user-vm.js';

declare module '../shared/vm/qmp.js' {
  interface QmpCommands {
    pmemsave: { args: { val: number; size: number; filename: string }; result: Record<string, never> };
  }
}

const hasQemu = spawnSync(QEMU_BIN, ['--version']).status === 0;
const MEMORY_BYTES = 256 << 20;
const DISK_BYTES = 64 << 20;
const QCOW2_BYTES = 16 << 20;

/** Runs `baseMain` in a process of its own, as the CLI would; bounded. */
function runBase(args: string[], timeoutMs: number): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const module = new URL('../cli/base.js', import.meta.url).href;
  const script = `const { baseMain } = await import(${JSON.stringify(module)}); process.exitCode = await baseMain(JSON.parse(process.env.BASE_ARGS));`;
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { env: { ...process.env, BASE_ARGS: JSON.stringify(args) }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`handoff base did not finish within ${timeoutMs / 1000} s: ${stderr}`));
    }, timeoutMs);
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

async function send(socket: Socket, data: Buffer): Promise<void> {
  if (socket.write(data)) return;
  await new Promise<void>((resolve, reject) => {
    const failed = (err: Error): void => {
      socket.off('drain', drained);
      reject(err);
    };
    const drained = (): void => {
      socket.off('error', failed);
      resolve();
    };
    socket.once('drain', drained);
    socket.once('error', failed);
  });
}

/**
 * A migration stream made from the base alone: the device state's header and configuration, RAM
 * (its block list, then every non-zero page of memory.img), the device sections, EOF.
 */
async function sendBaseStream(base: BaseFolder, socket: Socket): Promise<{ bytes: number; pages: number }> {
  const writer = new MigrationStreamWriter();
  const { ramSection, ramBlocks } = base.manifest;
  let bytes = 0;
  let pages = 0;
  const out = async (records: MigrationRecord[]): Promise<void> => {
    const data = Buffer.concat(records.map((r) => writer.encode(r)));
    bytes += data.byteLength;
    await send(socket, data);
  };
  for await (const r of parseMigrationStream(createReadStream(base.deviceStatePath))) {
    await out([r]);
    if (r.kind !== 'configuration') continue;
    const totalBytes = ramBlocks.reduce((a, b) => a + b.bytes, 0);
    await out([
      { kind: 'ram-section', phase: 'start', ...ramSection },
      { kind: 'ram-blocks', totalBytes, blocks: ramBlocks.map((b) => ({ idstr: b.idstr, lengthBytes: b.bytes })) },
      { kind: 'ram-eos', sectionId: ramSection.sectionId },
      { kind: 'ram-section', phase: 'end', sectionId: ramSection.sectionId },
    ]);
    let batch: MigrationRecord[] = [];
    for await (const page of readRamImagePages(base.memoryPath, { blocks: ramBlocks, bytes: base.manifest.memory.bytes })) {
      pages++;
      batch.push(page);
      if (batch.length === 256) {
        await out(batch);
        batch = [];
      }
    }
    await out([...batch, { kind: 'ram-eos', sectionId: ramSection.sectionId }]);
  }
  socket.end();
  return { bytes, pages };
}

describe('handoff base from a running QEMU', { timeout: 600_000, skip: hasQemu ? false : `${QEMU_BIN} is not installed` }, () => {
  let dir: string;
  const vms: UserVm[] = [];
  /** the guest of the first test, for those after it */
  let source: UserVm | undefined;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'base-snapshot-'));
  });
  after(async () => {
    for (const vm of vms) await vm.kill();
    await rm(dir, { recursive: true, force: true });
  });

  test('a user-started guest: the base is taken, the guest runs on, the base resumes in a second QEMU', async () => {
    const guest = buildGuest(GUEST_CACHE);
    const src = { qmp: join(dir, 'src.qmp'), serial: join(dir, 'src-serial.log'), disk: join(dir, 'src-disk.raw'), qcow2: join(dir, 'src-disk.qcow2') };
    // a sparse raw disk with some data at its start
    const disk = await open(src.disk, 'w');
    await disk.truncate(DISK_BYTES);
    await disk.write(Buffer.alloc(1 << 20, 0x5a), 0, 1 << 20, 0);
    await disk.close();
    await writeEmptyQcow2(src.qcow2, QCOW2_BYTES);
    const vm = await startUserVm(userVmArgv(guest, src), src);
    vms.push(vm);
    source = vm;
    await vm.waitCounter(3, 180_000);
    // set by the VM's owner: off for the base's migration, on again after it
    await vm.qmp!.execute('migrate-set-capabilities', { capabilities: [{ capability: 'xbzrle', state: true }] });
    // QEMU serves one QMP client: the base takes the socket
    vm.disconnect();

    const baseDir = join(dir, 'base');
    const before = vm.counter();
    const run = await runBase(['--qmp', src.qmp, '--out', baseDir, '--json'], 300_000);
    const afterBase = vm.counter();
    assert.equal(run.code, 0, `handoff base failed: ${run.stderr}`);
    const summary = JSON.parse(run.stdout) as BaseSummary;
    process.stderr.write(
      `handoff base: ${summary.seconds.toFixed(2)} s (migration ${summary.migrationSeconds.toFixed(2)} s, ${summary.streamBytes} bytes streamed), paused ${summary.pausedMs} ms; ` +
        `${summary.files.map((f) => `${f.file} ${f.bytes} (${f.allocatedBytes} allocated)`).join(', ')}; ` +
        `RAM blocks ${summary.ramBlocks.map((b) => `${b.idstr}=${b.bytes}@${b.offset}`).join(' ')}\n`,
    );

    // the folder is valid and holds what the summary says
    const base = await readBase(baseDir);
    assert.equal(base.manifest.version, 1);
    assert.deepEqual(base.manifest.sourceArgv, vm.argv);
    assert.equal(base.manifest.machine.memoryBytes, MEMORY_BYTES);
    assert.match(base.manifest.qemuVersion, /^\d+\.\d+\.\d+$/);
    const blockBytes = base.manifest.ramBlocks.reduce((a, b) => a + b.bytes, 0);
    assert.equal((await stat(base.memoryPath)).size, blockBytes, 'memory.img is not the RAM blocks one after another');
    assert.equal(base.manifest.memory.bytes, blockBytes);
    assert.equal(base.manifest.ramBlocks.find((b) => b.idstr === 'pc.ram')?.bytes, MEMORY_BYTES);
    assert.ok(base.manifest.ramBlocks.some((b) => b.idstr.endsWith('/vga.vram')), 'no vga.vram among the RAM blocks');
    const memoryFile = summary.files.find((f) => f.file === 'memory.img')!;
    assert.ok(memoryFile.allocatedBytes < memoryFile.bytes / 2, `memory.img is not sparse: ${memoryFile.allocatedBytes} of ${memoryFile.bytes} bytes allocated`);
    assert.deepEqual(summary.ramBlocks, base.manifest.ramBlocks);
    // the device state is the stream without its RAM: header, configuration, devices, EOF, description
    const kinds = new Set<string>();
    for await (const r of parseMigrationStream(createReadStream(base.deviceStatePath))) kinds.add(r.kind);
    assert.deepEqual([...kinds], ['header', 'configuration', 'device-section', 'eof', 'vm-description']);
    assert.ok(summary.pausedMs !== null && summary.pausedMs >= 0 && summary.pausedMs < 10_000, `paused ${summary.pausedMs} ms`);
    // the disks the command line names: a raw one, sparse, and a qcow2 one (probed, as QEMU does)
    assert.equal(base.manifest.disks.length, 2);
    const [baseDisk, qcow2Disk] = base.manifest.disks;
    assert.equal(baseDisk!.format, 'raw');
    assert.equal(baseDisk!.bytes, DISK_BYTES);
    assert.equal(baseDisk!.sourceFile, src.disk);
    assert.equal(base.manifest.machine.drives[baseDisk!.drive]?.interface, 'virtio');
    const diskFile = summary.files.find((f) => f.file === baseDisk!.file)!;
    assert.ok(diskFile.allocatedBytes < DISK_BYTES / 2, `the disk copy is not sparse: ${diskFile.allocatedBytes} bytes allocated`);
    assert.equal(qcow2Disk!.format, 'qcow2');
    assert.equal(qcow2Disk!.file, 'disk1.qcow2');
    assert.equal(base.manifest.machine.drives[qcow2Disk!.drive]?.interface, 'ide');
    assert.equal(readFileSync(base.diskPaths[1]!).subarray(0, 4).toString('latin1'), 'QFI\xfb');
    // the index was built with the base and is what a handoff loads
    const indexPath = `${base.memoryPath}.hidx`;
    const indexWritten = (await stat(indexPath)).mtimeMs;
    assert.equal((await loadBaseIndex(base.memoryPath)).contentHash, base.manifest.memory.contentHash);
    assert.equal((await stat(indexPath)).mtimeMs, indexWritten, 'the index was built again instead of reused');
    assert.deepEqual((await readdir(dir)).filter((f) => f.includes('partial')), [], 'a partial folder was left');

    // the source guest runs on
    await vm.waitCounter(afterBase + 3, 30_000);
    const qmp = await vm.connect();
    assert.equal((await qmp.execute('query-status')).status, 'running');
    const capabilities = await qmp.execute('query-migrate-capabilities');
    assert.equal(capabilities.find((c) => c.capability === 'xbzrle')?.state, true, "the owner's xbzrle was not set back");

    // the base resumes: the source's command line with this test's paths, a copy of the base disk
    const dst = { qmp: join(dir, 'dst.qmp'), serial: join(dir, 'dst-serial.log'), disk: join(dir, 'dst-disk.raw'), qcow2: join(dir, 'dst-disk.qcow2'), incoming: join(dir, 'dst-incoming.sock') };
    await copyFile(base.diskPaths[0]!, dst.disk);
    await copyFile(base.diskPaths[1]!, dst.qcow2);
    const local = (a: string): string => a.replace(src.qmp, dst.qmp).replace(src.serial, dst.serial).replace(src.disk, dst.disk).replace(src.qcow2, dst.qcow2);
    const destinationArgv = [...base.manifest.sourceArgv.map(local), '-S', '-incoming', 'defer'];
    const destination = await startUserVm(destinationArgv, dst);
    vms.push(destination);
    await destination.qmp!.execute('migrate-incoming', { uri: `unix:${dst.incoming}` });
    const toDestination = await connectWhenListening(dst.incoming, 10_000);
    try {
      const sent = await sendBaseStream(base, toDestination);
      await destination.qmp!.waitMigration(60_000);
      process.stderr.write(`rebuilt from the base: ${sent.bytes} bytes, ${sent.pages} non-zero pages\n`);
    } finally {
      toDestination.destroy();
    }
    assert.equal(await qemuMemoryHash(await destination.connect(), dir, MEMORY_BYTES), await imageMemoryHash(base, MEMORY_BYTES), "the destination's RAM before cont is not memory.img's");
    await destination.qmp!.execute('cont');
    const firstAtDestination = await waitFor(`the destination guest printed no counter (${destination.stderr()})`, 60_000, () => {
      const m = /handoff-counter (\d+)/.exec(readFileSync(dst.serial, 'utf8'));
      return m ? Number(m[1]) : undefined;
    });
    await destination.waitCounter(firstAtDestination + 3, 60_000);
    // the counter the base was taken at lies between the source's before and after the command
    assert.ok(firstAtDestination > before && firstAtDestination <= afterBase + 2, `the destination's first counter is ${firstAtDestination}; the source was at ${before} before the base and ${afterBase} after`);
    assert.doesNotMatch(readFileSync(dst.serial, 'utf8'), /Linux version|Booting/, 'the destination guest booted again');
    await destination.kill();
  });

  test('a migration that fails once started: the guest runs on, no folder is left', async (t) => {
    if (!source) return t.skip('the first test did not start the guest');
    const vm = source;
    vm.disconnect();
    const out = join(dir, 'base-timeout');
    // QEMU cannot send 256 MiB within 1 ms: the command cancels its migration
    const run = await runBase(['--qmp', vm.paths.qmp, '--out', out, '--timeout', '0.001'], 60_000);
    assert.equal(run.code, 1);
    assert.match(run.stderr, /QEMU's migration did not complete within 0\.001 s/);
    assert.deepEqual((await readdir(dir)).filter((f) => f.startsWith('base-timeout') || f.startsWith('.base-timeout')), [], 'a partial folder was left');
    const qmp = await vm.connect();
    assert.equal((await qmp.execute('query-status')).status, 'running');
    const at = vm.counter();
    await vm.waitCounter(at + 2, 30_000);
  });

  test('a paused VM: the base is taken and the VM stays paused', async (t) => {
    if (!source) return t.skip('the first test did not start the guest');
    const vm = source;
    const qmp = await vm.connect();
    await qmp.execute('stop');
    vm.disconnect();
    const out = join(dir, 'base-paused');
    const run = await runBase(['--qmp', vm.paths.qmp, '--out', out, '--json'], 300_000);
    assert.equal(run.code, 0, run.stderr);
    const summary = JSON.parse(run.stdout) as BaseSummary;
    assert.equal(summary.pausedMs, null);
    await readBase(out);
    const status = await (await vm.connect()).execute('query-status');
    assert.equal(status.running, false, `the VM runs after a base of it paused (${status.status})`);
  });
});

describe('handoff base: bad input', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'base-bad-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  test('--qmp at a socket nothing serves: a clear error, no folder', async () => {
    const run = await runBase(['--qmp', join(dir, 'nothing.qmp'), '--out', join(dir, 'base')], 30_000);
    assert.equal(run.code, 1);
    assert.match(run.stderr, /no QEMU behind the QMP socket .*nothing\.qmp: no such file/);
    assert.deepEqual(await readdir(dir), []);
  });

  test('--qmp at a socket a process other than QEMU serves: named', async () => {
    const path = join(dir, 'not-qemu.qmp');
    const server = createServer((s) => s.destroy());
    await new Promise<void>((resolve) => server.listen(path, resolve));
    try {
      const run = await runBase(['--qmp', path, '--out', join(dir, 'base')], 30_000);
      assert.equal(run.code, 1);
      assert.match(run.stderr, /the process behind the QMP socket .* is not QEMU: pid \d+/);
    } finally {
      server.close();
    }
  });

  test('missing options and a non-empty --out are refused before QEMU is asked anything', async () => {
    const missing = await runBase(['--qmp', join(dir, 'x.qmp')], 30_000);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /missing --out/);
    const full = join(dir, 'full');
    await mkdir(full);
    await writeFile(join(full, 'something'), 'x');
    const refused = await runBase(['--qmp', join(dir, 'x.qmp'), '--out', full], 30_000);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /--out .*full is not empty \(something\)/);
    const help = await runBase(['--help'], 30_000);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /--qmp SOCKET/);
  });
});

/** A FULL device section as QEMU writes it: header, the device's bytes, footer. */
function deviceSection(sectionId: number, idstr: string, body: Buffer): Buffer {
  const head = Buffer.alloc(1 + 4 + 1 + idstr.length + 8);
  head[0] = 0x04;
  head.writeUInt32BE(sectionId, 1);
  head[5] = idstr.length;
  head.write(idstr, 6, 'latin1');
  head.writeUInt32BE(0, 6 + idstr.length);
  head.writeUInt32BE(2, 10 + idstr.length);
  const footer = Buffer.alloc(5);
  footer[0] = 0x7e;
  footer.writeUInt32BE(sectionId, 1);
  return Buffer.concat([head, body, footer]);
}

describe('handoff base: the stream into files, and readBase, without QEMU', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'base-pieces-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const page = (fill: number): Buffer => Buffer.alloc(4096, fill);
  const head: MigrationRecord[] = [
    { kind: 'header', version: 3 },
    { kind: 'configuration', machineType: 'pc-i440fx-7.2', targetPageBits: 12 },
  ];
  const ram: MigrationRecord[] = [
    { kind: 'ram-section', phase: 'start', sectionId: 2, instanceId: 0, versionId: 4 },
    { kind: 'ram-blocks', totalBytes: 12288, blocks: [{ idstr: 'pc.ram', lengthBytes: 8192 }, { idstr: 'pc.bios', lengthBytes: 4096 }] },
    { kind: 'ram-zero', block: 'pc.ram', offset: 0, fill: 0 },
    { kind: 'ram-page', block: 'pc.ram', offset: 4096, data: page(0x11) },
    { kind: 'ram-eos', sectionId: 2 },
    { kind: 'ram-section', phase: 'end', sectionId: 2 },
    { kind: 'ram-page', block: 'pc.bios', offset: 0, data: page(0x22) },
    // a page sent before and zero now: overwritten
    { kind: 'ram-zero', block: 'pc.ram', offset: 4096, fill: 0 },
    { kind: 'ram-eos', sectionId: 2 },
  ];

  async function receive(name: string, stream: Buffer): Promise<{ memory: string; deviceState: string; result: Awaited<ReturnType<typeof receiveBaseStream>> }> {
    const folder = join(dir, name);
    await mkdir(folder);
    const memory = await RamImageWriter.create(join(folder, 'memory.img'));
    const deviceState = await open(join(folder, 'device-state.bin'), 'wx');
    try {
      // arrives in small pieces, as from a socket
      const chunks = Array.from({ length: Math.ceil(stream.byteLength / 1000) }, (_, i) => stream.subarray(i * 1000, (i + 1) * 1000));
      const result = await receiveBaseStream((async function* () { yield* chunks; })(), memory, deviceState);
      return { memory: join(folder, 'memory.img'), deviceState: join(folder, 'device-state.bin'), result };
    } finally {
      await memory.close();
      await deviceState.close();
    }
  }

  test('RAM pages at their offsets in the flat image, the rest as the device state', async () => {
    const writer = new MigrationStreamWriter();
    const timer = deviceSection(3, 'timer', Buffer.from('some device bytes'));
    const stream = Buffer.concat([...[...head, ...ram].map((r) => writer.encode(r)), timer, writer.encode({ kind: 'eof' })]);
    const { memory, deviceState, result } = await receive('ok', stream);
    assert.equal(result.machineType, 'pc-i440fx-7.2');
    assert.deepEqual(result.ramSection, { sectionId: 2, instanceId: 0, versionId: 4 });
    assert.equal(result.streamBytes, stream.byteLength);
    const image = readFileSync(memory);
    assert.equal(image.byteLength, 12288);
    assert.ok(image.subarray(0, 8192).equals(Buffer.alloc(8192)), 'pc.ram is not zero');
    assert.ok(image.subarray(8192).equals(page(0x22)), 'pc.bios is not at its offset');
    const kinds: string[] = [];
    for await (const r of parseMigrationStream(createReadStream(deviceState))) kinds.push(r.kind === 'device-section' ? `device-section ${r.idstr}` : r.kind);
    assert.deepEqual(kinds, ['header', 'configuration', 'device-section timer', 'eof']);
    const pages = [];
    for await (const p of readRamImagePages(memory, ramLayout([{ idstr: 'pc.ram', lengthBytes: 8192 }, { idstr: 'pc.bios', lengthBytes: 4096 }]))) pages.push(`${p.block}@${p.offset}`);
    assert.deepEqual(pages, ['pc.bios@0']);
  });

  test('a stream QEMU did not write, or cut short: an error with its offset', async () => {
    const writer = new MigrationStreamWriter();
    const start = Buffer.concat(head.map((r) => writer.encode(r)));
    await assert.rejects(receive('bad', Buffer.concat([start, Buffer.from([0x42])])), new RegExp(`QEMU's migration stream: migration stream malformed at byte ${start.byteLength}: expected a section type`));
    await assert.rejects(receive('short', start.subarray(0, 8)), /QEMU's migration stream: migration stream truncated at byte 8/);
    await assert.rejects(receive('no-eof', Buffer.concat([start, ...ram.map((r) => writer.encode(r))])), /truncated/);
  });

  test('readBase names the file and the problem', async () => {
    const writer = new MigrationStreamWriter();
    const stream = Buffer.concat([...[...head, ...ram].map((r) => writer.encode(r)), writer.encode({ kind: 'eof' })]);
    const { memory, deviceState, result } = await receive('folder', stream);
    const folder = join(dir, 'folder');
    await writeFile(join(folder, 'disk0.img'), Buffer.alloc(8192));
    const manifest: BaseManifest = {
      version: 1,
      createdAt: new Date().toISOString(),
      qemuVersion: '7.2.22',
      sourceArgv: ['qemu-system-x86_64', '-m', '256M'],
      machine: describeMachine(['qemu-system-x86_64', '-m', '256M', '-hda', 'disk.img']),
      machineType: result.machineType,
      ramSection: result.ramSection,
      ramBlocks: ramLayout([{ idstr: 'pc.ram', lengthBytes: 8192 }, { idstr: 'pc.bios', lengthBytes: 4096 }]).blocks,
      memory: { file: 'memory.img', bytes: 12288, contentHash: 'a'.repeat(64) },
      disks: [{ file: 'disk0.img', bytes: 8192, format: 'raw', drive: 0, sourceFile: '/images/disk.img' }],
      deviceState: { file: 'device-state.bin', bytes: (await stat(deviceState)).size },
    };
    const write = (m: unknown): Promise<void> => writeFile(join(folder, 'base.json'), JSON.stringify(m));
    await write(manifest);
    const base = await readBase(folder);
    assert.equal(base.memoryPath, memory);
    assert.deepEqual(base.diskPaths, [join(folder, 'disk0.img')]);

    await write({ ...manifest, version: 2 });
    await assert.rejects(readBase(folder), /base\.json: version is 2; this handoff reads version 1/);
    await write({ ...manifest, memory: { ...manifest.memory, bytes: 16384 } });
    await assert.rejects(readBase(folder), /memory image memory\.img is 12288 bytes, base\.json says 16384/);
    await write({ ...manifest, ramBlocks: [{ ...manifest.ramBlocks[0]!, offset: 100 }] });
    await assert.rejects(readBase(folder), /ramBlocks\[0\]\.offset 100 is not a multiple of 4096/);
    await write({ ...manifest, disks: [{ ...manifest.disks[0]!, file: 'disk1.img' }] });
    await assert.rejects(readBase(folder), /disk 0 disk1\.img is missing \(ENOENT\)/);
    await write(manifest);
    await rm(deviceState);
    await assert.rejects(readBase(folder), /device state device-state\.bin is missing \(ENOENT\)/);
    await rm(join(folder, 'base.json'));
    await assert.rejects(readBase(folder), /base\.json cannot be read \(ENOENT\)/);
  });
});
