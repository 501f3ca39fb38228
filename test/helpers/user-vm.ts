/**
 * The test guest started the way a user starts a VM: ordinary RAM, QEMU's default devices, a virtio
 * NIC, a raw disk (and a qcow2 one if asked), a QMP socket; no memory-backend-file, no -nodefaults. Tests that take a base of
 * it, or hand it off, share this; a destination is started from the same command line with its own
 * paths.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { stopProcess } from '../../shared/actor/child.js';
import type { GuestFiles } from '../../shared/testdata/guest.js';
import { accelerator, lastCounter, QEMU_BIN } from '../../shared/vm/qemu.js';
import { QmpClient } from '../../shared/vm/qmp.js';

export interface UserVmPaths {
  qmp: string;
  serial: string;
  /** a raw disk image (if=virtio: the test guest writes to it) */
  disk?: string;
  /** a qcow2 image as a second IDE disk (-hdb, its format left for QEMU to probe) */
  qcow2?: string;
}

/** The command line a user writes, program first. */
export function userVmArgv(guest: GuestFiles, paths: UserVmPaths, memory = '256M'): string[] {
  return [
    ...[QEMU_BIN, '-machine', `pc,accel=${accelerator()}`, '-m', memory, '-smp', '1', '-display', 'none', '-no-reboot'],
    ...['-kernel', guest.kernel, '-initrd', guest.initrd, '-append', 'console=ttyS0 quiet panic=-1'],
    ...['-nic', 'user,model=virtio-net-pci'],
    ...(paths.disk ? ['-drive', `file=${paths.disk},format=raw,if=virtio`] : []),
    ...(paths.qcow2 ? ['-hdb', paths.qcow2] : []),
    ...['-chardev', `file,id=serial0,path=${paths.serial}`, '-serial', 'chardev:serial0'],
    ...['-qmp', `unix:${paths.qmp},server=on,wait=off`],
  ];
}

const QCOW2_CLUSTER_BYTES = 1 << 16;

/**
 * An empty qcow2 (version 2) image of `bytes` virtual size, without qemu-img: the header, a
 * refcount table and block, and an L1 table, one 64 KiB cluster each; no data cluster yet.
 */
export async function writeEmptyQcow2(path: string, bytes: number): Promise<void> {
  const c = QCOW2_CLUSTER_BYTES;
  const image = Buffer.alloc(4 * c);
  image.writeUInt32BE(0x514649fb, 0); // QFI\xfb
  image.writeUInt32BE(2, 4); // version
  image.writeUInt32BE(16, 20); // cluster_bits
  image.writeBigUInt64BE(BigInt(bytes), 24); // size
  image.writeUInt32BE(Math.ceil(bytes / (c * (c / 8))), 36); // l1_size: one L2 table maps c/8 clusters
  image.writeBigUInt64BE(BigInt(3 * c), 40); // l1_table_offset
  image.writeBigUInt64BE(BigInt(c), 48); // refcount_table_offset
  image.writeUInt32BE(1, 56); // refcount_table_clusters
  image.writeBigUInt64BE(BigInt(2 * c), c); // the refcount table's first block
  for (let cluster = 0; cluster < 4; cluster++) image.writeUInt16BE(1, 2 * c + 2 * cluster); // each cluster used once
  await writeFile(path, image);
}

/** Resolves with the probe's first defined value; fails naming `what` after `timeoutMs`. */
export async function waitFor<T>(what: string, timeoutMs: number, probe: () => T | undefined | Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`${what} within ${timeoutMs / 1000} s`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A connection to a unix socket, once something listens on it (a destination's -incoming). */
export async function connectWhenListening(path: string, timeoutMs: number): Promise<Socket> {
  return waitFor(`nothing listens on ${path}`, timeoutMs, () =>
    new Promise<Socket | undefined>((resolve) => {
      const s = connect(path);
      s.once('connect', () => resolve(s));
      s.once('error', () => resolve(undefined));
    }),
  );
}

export interface UserVm {
  child: ChildProcess;
  argv: string[];
  paths: UserVmPaths;
  /** the QMP client, while connected (QEMU serves one: disconnect before another tool connects) */
  qmp: QmpClient | undefined;
  connect(): Promise<QmpClient>;
  disconnect(): void;
  /** the last `handoff-counter N` on the serial console */
  counter(): number;
  waitCounter(n: number, timeoutMs: number): Promise<number>;
  stderr(): string;
  /** quit over QMP, then signals */
  kill(): Promise<void>;
}

/** Starts QEMU with `argv` (program first) and connects to its QMP socket. */
export async function startUserVm(argv: string[], paths: UserVmPaths): Promise<UserVm> {
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<never>((_, reject) => child.once('exit', (code, signal) => reject(new Error(`QEMU exited (${code ?? signal}): ${stderr.trim()}`))));
  exited.catch(() => undefined);
  const vm: UserVm = {
    child,
    argv,
    paths,
    qmp: undefined,
    connect: async () => {
      vm.qmp ??= await Promise.race([QmpClient.connect(paths.qmp, 30_000), exited]);
      return vm.qmp;
    },
    disconnect: () => {
      vm.qmp?.close();
      vm.qmp = undefined;
    },
    counter: () => lastCounter(paths.serial),
    waitCounter: (n, timeoutMs) =>
      waitFor(`the guest did not reach counter ${n} (at ${lastCounter(paths.serial)}; ${stderr.trim()})`, timeoutMs, () => {
        if (child.exitCode !== null) throw new Error(`QEMU exited (${child.exitCode}): ${stderr.trim()}`);
        const c = lastCounter(paths.serial);
        return c >= n ? c : undefined;
      }),
    stderr: () => stderr.trim(),
    kill: async () => {
      if (child.exitCode === null && child.signalCode === null) {
        const qmp = vm.qmp ?? (await QmpClient.connect(paths.qmp, 3000).catch(() => undefined));
        await qmp?.execute('quit').catch(() => undefined);
        qmp?.close();
        vm.qmp = undefined;
      }
      await stopProcess(child, 3000);
    },
  };
  try {
    await vm.connect();
  } catch (err) {
    await stopProcess(child, 2000);
    throw err;
  }
  return vm;
}
