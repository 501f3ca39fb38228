/**
 * The destination's half of a handoff from QEMU's own stream, on a real QEMU and without a source
 * pipeline: a base of the busybox guest (started as a user starts it), and a later base of the same
 * guest standing for what a handoff brings. The resumer starts QEMU on the base's machine, feeds it
 * the base at once and the later pages as "the rebuild" writes them, then the later device state
 * (patched against the base's, as a source sends it); QEMU completes the incoming migration, its
 * memory is the later one, and after `cont` the guest counts on without booting again. A machine
 * with other RAM or without the NIC is refused naming the difference, and a QEMU that cannot load
 * the stream fails with its own words.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { GUEST_CACHE } from '../load/lib/vm.js';
import { encodePatch } from '../shared/codecs/patch.js';
import { PAGE_SIZE } from '../shared/image/pages.js';
import { createLogger } from '../shared/telemetry/log.js';
import { buildGuest } from '../shared/testdata/guest.js';
import { readBase, type BaseFolder } from '../shared/vm/base-manifest.js';
import { takeBase } from '../shared/vm/base-snapshot.js';
import { QEMU_BIN, lastCounter } from '../shared/vm/qemu.js';
import { QmpClient } from '../shared/vm/qmp.js';
import { WrittenPages, streamRefusal, type StreamDestination } from '../services/receiver/stream-resume.js';
import { StreamResumer, nodeHostFiles } from '../services/receiver/stream-resumer.js';
import { startReceiver, type RunningReceiver } from '../services/receiver/service.js';
import { startEmbeddedNats, type EmbeddedNats } from '../shared/bus/nats-server.js';
import { dialLink, ensureLocalLinkKey, linkSecurityFromEnv } from '../shared/wire/link-security.js';
import { FrameReader, FrameType, encodeFrame, encodeJsonFrame, parseReason, parseResult, type Frame, type Hello } from '../shared/wire/frames.js';
import { imageMemoryHash, qemuMemoryHash } from './helpers/guest-memory.js';
import { startUserVm, userVmArgv, waitFor, type UserVm } from './helpers/user-vm.js';

const hasQemu = spawnSync(QEMU_BIN, ['--version']).status === 0;
const MEMORY_BYTES = 256 << 20;
const DISK_BYTES = 64 << 20;
const log = createLogger({ stage: 'stream-resume-test' });

/** The pages in which two memory images of one layout differ. */
async function differingPages(a: string, b: string, bytes: number): Promise<number[]> {
  const [fa, fb] = await Promise.all([open(a, 'r'), open(b, 'r')]);
  const pages: number[] = [];
  try {
    const step = 1 << 20;
    const ba = Buffer.alloc(step);
    const bb = Buffer.alloc(step);
    for (let at = 0; at < bytes; at += step) {
      const n = Math.min(step, bytes - at);
      await fa.read(ba, 0, n, at);
      await fb.read(bb, 0, n, at);
      for (let p = 0; p < n; p += PAGE_SIZE) if (ba.compare(bb, p, p + PAGE_SIZE, p, p + PAGE_SIZE) !== 0) pages.push((at + p) / PAGE_SIZE);
    }
  } finally {
    await Promise.all([fa.close(), fb.close()]);
  }
  return pages;
}

/** Copies pages `pages` of image `from` into image `to`, as the rebuild writes them. */
async function writePages(from: string, to: string, pages: number[]): Promise<void> {
  const [src, dst] = await Promise.all([open(from, 'r'), open(to, 'r+')]);
  try {
    const page = Buffer.alloc(PAGE_SIZE);
    for (const p of pages) {
      await src.read(page, 0, PAGE_SIZE, p * PAGE_SIZE);
      await dst.write(page, 0, PAGE_SIZE, p * PAGE_SIZE);
    }
  } finally {
    await Promise.all([src.close(), dst.close()]);
  }
}

/** A hand-driven source end of the link: frames sent, frames awaited by type. */
async function sourceLink(address: { host: string; port: number }): Promise<{ send(frame: Buffer): void; next(type: number, timeoutMs: number): Promise<Frame>; close(): void }> {
  const socket = await dialLink(address.host, address.port, linkSecurityFromEnv(), 5000);
  const reader = new FrameReader();
  const got: Frame[] = [];
  let notify: (() => void) | undefined;
  socket.on('data', (d: Buffer) => {
    got.push(...reader.push(d));
    notify?.();
  });
  socket.on('error', () => undefined);
  return {
    send: (frame) => void socket.write(frame),
    next: (type, timeoutMs) =>
      withTimeout(`no frame of type ${type} from the receiver`, timeoutMs, (async () => {
        for (;;) {
          const i = got.findIndex((f) => f.type === type || f.type === FrameType.Refuse || f.type === FrameType.Error);
          if (i >= 0) {
            const [f] = got.splice(i, 1);
            if (f!.type !== type) throw new Error(`the receiver answered ${f!.type === FrameType.Refuse ? 'REFUSE' : 'ERROR'}: ${parseReason(f!, 'answer')}`);
            return f!;
          }
          await new Promise<void>((resolve) => (notify = resolve));
        }
      })()),
    close: () => socket.destroy(),
  };
}

function withTimeout<T>(what: string, timeoutMs: number, promise: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} within ${timeoutMs / 1000} s`)), timeoutMs)));
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

describe("resuming the source's own machine from QEMU's stream", { timeout: 600_000, skip: hasQemu ? false : `${QEMU_BIN} is not installed` }, () => {
  let dir: string;
  const vms: UserVm[] = [];
  const resumers: StreamResumer[] = [];
  let base: BaseFolder | undefined;
  let later: BaseFolder | undefined;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stream-resume-'));
  });
  after(async () => {
    for (const r of resumers) await r.abort().catch(() => undefined);
    for (const vm of vms) await vm.kill();
    await rm(dir, { recursive: true, force: true });
  });

  test('fed the base at once and later pages as they come, then the device state: QEMU completes, the guest counts on', async () => {
    const guest = buildGuest(GUEST_CACHE);
    const src = { qmp: join(dir, 'src.qmp'), serial: join(dir, 'src-serial.log'), disk: join(dir, 'src-disk.raw') };
    const disk = await open(src.disk, 'w');
    await disk.truncate(DISK_BYTES);
    await disk.write(Buffer.alloc(1 << 20, 0x5a), 0, 1 << 20, 0);
    await disk.close();
    const vm = await startUserVm(userVmArgv(guest, src), src);
    vms.push(vm);
    await vm.waitCounter(3, 180_000);
    vm.disconnect();
    base = await readBase((await takeBase({ qmpSocket: src.qmp, outDir: join(dir, 'base') })).dir);
    await vm.waitCounter(vm.counter() + 3, 60_000);
    const beforeLater = vm.counter();
    later = await readBase((await takeBase({ qmpSocket: src.qmp, outDir: join(dir, 'later') })).dir);
    const afterLater = vm.counter();
    // the guest lives on in `later` only
    await vm.kill();

    // what the rebuild starts from: the base's images
    const out = join(dir, 'out');
    await mkdir(out);
    const memory = join(out, 'memory.img.partial');
    const rebuiltDisk = join(out, 'disk.img.partial');
    await copyFile(base.memoryPath, memory);
    await copyFile(later.diskPaths[0]!, rebuiltDisk);
    const written = new WrittenPages(base.manifest.memory.bytes / PAGE_SIZE);
    const failures: string[] = [];
    // the operator's command line: the source's, with a second QMP socket (mapped into the folder) for this test
    const qemuCommand = [...base.manifest.sourceArgv, '-qmp', 'unix:/nowhere/test.qmp,server=on,wait=off'];
    const startedAt = performance.now();
    const resumer = await StreamResumer.prepare({ argv: base.manifest.sourceArgv, ramBlocks: base.manifest.ramBlocks }, { base, qemuCommand }, { memory, disk: rebuiltDisk }, out, { written, flush: () => undefined }, log, (r) => failures.push(r));
    resumers.push(resumer);
    const startMs = performance.now() - startedAt;
    assert.ok(resumer.argv.includes(`unix:${join(out, 'qmp-1.sock')},server=on,wait=off`), resumer.argv.join(' '));
    assert.deepEqual(resumer.argv.slice(-3), ['-S', '-incoming', 'defer']);

    // the rebuild writes the later pages that differ, in two rounds, the second at the end
    const changed = await differingPages(base.memoryPath, later.memoryPath, base.manifest.memory.bytes);
    assert.ok(changed.length > 0, 'the guest changed no page between the two bases');
    const firstRound = changed.filter((_, i) => i % 2 === 0);
    const lastRound = changed.filter((_, i) => i % 2 === 1);
    await writePages(later.memoryPath, memory, firstRound);
    for (const p of firstRound) written.mark(p);
    await waitFor('the feeder did not take the first round', 60_000, () => (written.count === 0 && resumer.figures.rebuiltPages >= firstRound.length ? true : undefined));
    await writePages(later.memoryPath, memory, lastRound);
    for (const p of lastRound) written.mark(p);

    // the final round: the later device state, patched against the base's as a source sends it
    const patch = encodePatch(await readFile(later.deviceStatePath), await readFile(base.deviceStatePath)).toString('base64');
    await withTimeout('the destination did not load the device state', 90_000, resumer.load(patch));
    assert.deepEqual(failures, []);
    const f = resumer.figures;
    process.stderr.write(
      `stream resume: QEMU up and listening in ${startMs.toFixed(0)} ms; fed before the final ${f.bytesBeforeFinal} bytes (${f.basePages} base pages, ${f.rebuiltPages} rebuilt pages); ` +
        `final ${f.finalPages} pages + device state = ${f.finalBytes} bytes, device state to completed ${f.finalMs.toFixed(1)} ms; ${changed.length} pages differed from the base\n`,
    );
    assert.equal(f.rebuiltPages, firstRound.length);
    assert.equal(f.finalPages, lastRound.length);

    // loaded, not running; its memory is the later base's
    const qmp = await QmpClient.connect(join(out, 'qmp-1.sock'), 10_000);
    try {
      assert.notEqual((await qmp.execute('query-status')).running, true);
      assert.equal(await qemuMemoryHash(qmp, dir, MEMORY_BYTES), await imageMemoryHash(later, MEMORY_BYTES), "the destination's RAM before cont is not the later image's");
    } finally {
      qmp.close();
    }
    await resumer.resume();
    const serial = resumer.info.serialLog;
    assert.equal(serial, join(out, 'serial0.log'));
    const first = await waitFor(`the destination guest printed no counter (${readFileSync(join(out, 'qemu-errors.log'), 'utf8')})`, 60_000, () => {
      const m = /handoff-counter (\d+)/.exec(readFileSync(serial, 'utf8'));
      return m ? Number(m[1]) : undefined;
    });
    await waitFor(`the destination guest did not count past ${first + 2}`, 60_000, () => (lastCounter(serial) > first + 2 ? true : undefined));
    assert.ok(first > beforeLater && first <= afterLater + 2, `the destination's first counter is ${first}; the source was at ${beforeLater} before the later base and ${afterLater} after`);
    assert.doesNotMatch(readFileSync(serial, 'utf8'), /Linux version|Booting/, 'the destination guest booted again');
  });

  test('a destination machine with another RAM size or without the NIC is refused, naming the difference', (t) => {
    if (!base) return t.skip('the first test took no base');
    const { manifest } = base;
    const destination: StreamDestination = { ramBlocks: manifest.ramBlocks, baseMachine: manifest.machine, diskDrive: manifest.disks[0]!.drive, host: nodeHostFiles };
    const machine = { argv: manifest.sourceArgv, ramBlocks: manifest.ramBlocks };
    assert.equal(streamRefusal(machine, destination), undefined);
    const more = manifest.sourceArgv.map((a) => (a === '256M' ? '512M' : a));
    assert.equal(streamRefusal(machine, { ...destination, qemuCommand: more }), "the destination cannot run the source's machine: memory: source 256 MiB, destination 512 MiB");
    const noNic = manifest.sourceArgv.map((a) => (a === 'user,model=virtio-net-pci' ? 'none' : a));
    assert.equal(
      streamRefusal(machine, { ...destination, qemuCommand: noNic }),
      "the destination cannot run the source's machine: device virtio-net-pci missing at the destination; network backend user missing at the destination",
    );
  });

  test("through the receiver: the machine's hello, a final round with its device state, the go: the VM runs; another machine refused on the link", async (t) => {
    if (!base) return t.skip('the first test took no base');
    ensureLocalLinkKey();
    const nats: EmbeddedNats = await startEmbeddedNats();
    const receivers: RunningReceiver[] = [];
    let pid: number | undefined;
    try {
      const outDir = join(dir, 'received');
      const options = { listen: '127.0.0.1:0', baseMemory: base.memoryPath, baseDisk: base.diskPaths[0]!, outDir, natsUrl: nats.url };
      const receiver = await startReceiver({ ...options, stream: { base } });
      receivers.push(receiver);
      const hello: Hello = {
        migrationId: 'stream-1',
        baseHashes: receiver.baseHashes,
        bytes: { memory: base.manifest.memory.bytes, disk: base.manifest.disks[0]!.bytes },
        machine: { argv: base.manifest.sourceArgv, ramBlocks: base.manifest.ramBlocks },
      };
      const link = await sourceLink(receiver.address);
      try {
        link.send(encodeJsonFrame(FrameType.Hello, hello));
        await link.next(FrameType.Accept, 10_000);
        // nothing changed since the base: no chunk, the base's own device state
        const deviceState = await readFile(base.deviceStatePath);
        link.send(encodeJsonFrame(FrameType.Captured, { round: 0, slices: 0, imageHashes: receiver.baseHashes, final: true, deviceState: encodePatch(deviceState, deviceState).toString('base64') }));
        const result = parseResult(await link.next(FrameType.Result, 90_000));
        assert.equal(result.verified, true, result.reason);
        assert.equal(result.vmReady, true, result.vmError);
        link.send(encodeFrame(FrameType.Go, Buffer.alloc(0)));
        await link.next(FrameType.Resumed, 30_000);
      } finally {
        link.close();
      }
      const received = await withTimeout('the receiver reported no migration', 30_000, receiver.next());
      pid = received.vm?.pid;
      assert.ok(received.feed && received.feed.basePages > 0 && received.feed.finalMs > 0, JSON.stringify(received.feed));
      assert.equal(received.vm?.serialLog, join(outDir, 'serial0.log'));
      const serial = received.vm!.serialLog;
      await waitFor('the resumed guest printed no counter', 60_000, () => (lastCounter(serial) > 0 ? true : undefined));
      assert.doesNotMatch(readFileSync(serial, 'utf8'), /Linux version|Booting/, 'the destination guest booted again');
      const qmp = await QmpClient.connect(received.vm!.qmpSocket, 10_000);
      assert.equal((await qmp.execute('query-status')).status, 'running');
      await qmp.execute('quit').catch(() => undefined);
      qmp.close();

      // a destination whose operator runs another RAM size: refused at the hello, the difference named
      const other = await startReceiver({ ...options, outDir: join(dir, 'received-512'), stream: { base, qemuCommand: base.manifest.sourceArgv.map((a) => (a === '256M' ? '512M' : a)) } });
      receivers.push(other);
      const refused = await sourceLink(other.address);
      try {
        refused.send(encodeJsonFrame(FrameType.Hello, { ...hello, migrationId: 'stream-2' }));
        const answer = await refused.next(FrameType.Refuse, 10_000);
        assert.equal(parseReason(answer, 'refuse'), "the destination cannot run the source's machine: memory: source 256 MiB, destination 512 MiB");
      } finally {
        refused.close();
      }
    } finally {
      if (pid !== undefined) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // quit already
        }
      }
      for (const r of receivers) await r.stop();
      await nats.stop();
    }
  });

  test("a QEMU that cannot load the stream fails with its own words, not a closed socket", async (t) => {
    if (!base) return t.skip('the first test took no base');
    const out = join(dir, 'out-512');
    await mkdir(out);
    const memory = join(out, 'memory.img.partial');
    const disk = join(out, 'disk.img.partial');
    await copyFile(base.memoryPath, memory);
    await copyFile(base.diskPaths[0]!, disk);
    const failures: string[] = [];
    // past the hello's check: QEMU itself meets RAM blocks it does not have
    const qemuCommand = base.manifest.sourceArgv.map((a) => (a === '256M' ? '512M' : a));
    const resumer = await StreamResumer.prepare({ argv: base.manifest.sourceArgv, ramBlocks: base.manifest.ramBlocks }, { base, qemuCommand }, { memory, disk }, out, { written: new WrittenPages(1), flush: () => undefined }, log, (r) => failures.push(r));
    resumers.push(resumer);
    const reason = await waitFor('the resumer reported no failure', 30_000, () => failures[0]);
    process.stderr.write(`QEMU refused the stream: ${reason}\n`);
    assert.match(reason, /^destination QEMU: .*pc\.ram/s);
    assert.doesNotMatch(reason, /^destination QEMU: (QMP connection closed|write EPIPE|read ECONNRESET)/);
    await assert.rejects(resumer.load(''), (err: Error) => err.message === reason);
  });
});
