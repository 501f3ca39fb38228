/**
 * A QEMU guest whose RAM lives in a shared file (memory-backend-file, share=on), so that capture can
 * read it and the destination can start on a rebuilt copy. The command line is made from a
 * description that travels with the migration and paths local to each cloudlet: both ends build
 * the same machine, which is what QEMU needs to load the device state.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync } from 'node:fs';
import { stopProcess } from '../actor/child.js';
import { QmpClient } from './qmp.js';

/** What both cloudlets agree on (no local paths). */
export interface VmDescription {
  memoryBytes: number;
  cpus: number;
  /** kernel command line; kernel and initrd are part of the base VM each cloudlet holds */
  append: string;
}

/** Where this cloudlet keeps the VM's files. */
export interface VmPaths {
  memoryFile: string;
  disk: string;
  kernel: string;
  initrd: string;
  qmpSocket: string;
  serialLog: string;
}

export const QEMU_BIN = process.env.QEMU_BIN ?? 'qemu-system-x86_64';

/**
 * KVM when this machine has it, else TCG (software emulation). /dev/kvm alone is not enough: some
 * sandboxes offer the device without the CPU's virtualization (no vmx/svm flag), and a guest then
 * never runs. HANDOFF_QEMU_ACCEL=kvm|tcg decides instead.
 */
export function accelerator(): 'kvm' | 'tcg' {
  const forced = process.env.HANDOFF_QEMU_ACCEL;
  if (forced === 'kvm' || forced === 'tcg') return forced;
  if (!existsSync('/dev/kvm')) return 'tcg';
  try {
    return /\b(vmx|svm)\b/.test(readFileSync('/proc/cpuinfo', 'utf8')) ? 'kvm' : 'tcg';
  } catch {
    return 'tcg';
  }
}

export function qemuArgs(vm: VmDescription, paths: VmPaths, incoming: boolean): string[] {
  return [
    '-nodefaults',
    '-display',
    'none',
    '-no-reboot',
    '-machine',
    `q35,accel=${accelerator()},memory-backend=mem`,
    '-object',
    `memory-backend-file,id=mem,size=${vm.memoryBytes},mem-path=${paths.memoryFile},share=on`,
    '-m',
    `${vm.memoryBytes / 2 ** 20}M`,
    '-smp',
    String(vm.cpus),
    '-kernel',
    paths.kernel,
    '-initrd',
    paths.initrd,
    '-append',
    vm.append,
    '-drive',
    `file=${paths.disk},format=raw,if=virtio`,
    '-chardev',
    `file,id=serial0,path=${paths.serialLog}`,
    '-serial',
    'chardev:serial0',
    '-qmp',
    `unix:${paths.qmpSocket},server=on,wait=off`,
    ...(incoming ? ['-incoming', 'defer'] : []),
  ];
}

export interface RunningVm {
  child: ChildProcess;
  qmp: QmpClient;
  paths: VmPaths;
  /** the last `handoff-counter N` the guest printed (0 before the first) */
  counter(): number;
  /** resolves when the guest has printed a counter of at least `n` */
  waitCounter(n: number, timeoutMs?: number): Promise<number>;
  /** ends QEMU (quit over QMP, then signals) */
  kill(): Promise<void>;
}

/** The test guest prints `handoff-counter N` on its serial console. */
export function lastCounter(serialLog: string): number {
  let text: string;
  try {
    text = readFileSync(serialLog, 'utf8');
  } catch {
    return 0;
  }
  const all = [...text.matchAll(/handoff-counter (\d+)/g)];
  return all.length ? Number(all.at(-1)![1]) : 0;
}

export async function startQemu(vm: VmDescription, paths: VmPaths, options: { incoming?: boolean; prefix?: string[]; detached?: boolean } = {}): Promise<RunningVm> {
  const args = qemuArgs(vm, paths, options.incoming ?? false);
  const [command, ...prefixArgs] = options.prefix?.length ? [...options.prefix, QEMU_BIN] : [QEMU_BIN];
  // detached: a VM that outlives this process (its errors go to a file beside the serial log)
  const errorLog = `${paths.serialLog}.qemu-errors`;
  const stderrTo = options.detached ? openSync(errorLog, 'a') : 'pipe';
  const child = spawn(command!, [...prefixArgs, ...args], { stdio: ['ignore', 'ignore', stderrTo], detached: options.detached ?? false });
  if (typeof stderrTo === 'number') {
    closeSync(stderrTo);
    child.unref();
  }
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const errors = (): string => (options.detached ? (existsSync(errorLog) ? readFileSync(errorLog, 'utf8') : '') : stderr).trim().slice(0, 500);
  const exited = new Promise<never>((_, reject) =>
    child.once('exit', (code, signal) => reject(new Error(`QEMU exited (${code ?? signal}) before its QMP answered: ${errors()}`))),
  );
  exited.catch(() => undefined);
  let qmp: QmpClient;
  try {
    qmp = await Promise.race([QmpClient.connect(paths.qmpSocket), exited]);
  } catch (err) {
    await stopProcess(child, 2000);
    throw err;
  }
  const counter = (): number => lastCounter(paths.serialLog);
  return {
    child,
    qmp,
    paths,
    counter,
    waitCounter: async (n, timeoutMs = 120_000) => {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const c = counter();
        if (c >= n) return c;
        if (child.exitCode !== null) throw new Error(`the guest's QEMU exited: ${errors()}`);
        if (Date.now() > deadline) throw new Error(`the guest did not reach counter ${n} within ${timeoutMs / 1000} s (at ${c})`);
        await new Promise((r) => setTimeout(r, 100));
      }
    },
    kill: async () => {
      await qmp.execute('quit').catch(() => undefined);
      qmp.close();
      await stopProcess(child, 3000);
    },
  };
}

/**
 * The device state alone (RAM is in the shared file): with the guest stopped, QMP migrate with
 * x-ignore-shared to a file (`exec:cat > FILE`).
 */
export async function saveDeviceState(qmp: QmpClient, file: string): Promise<void> {
  await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
  await qmp.execute('migrate', { uri: `exec:cat > ${shellQuote(file)}` });
  await qmp.waitMigration();
}

/** At the destination (QEMU started with -incoming defer): loads the device state from a file. */
export async function loadDeviceState(qmp: QmpClient, file: string): Promise<void> {
  await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
  await qmp.execute('migrate-incoming', { uri: `exec:cat ${shellQuote(file)}` });
  await qmp.waitMigration();
}

function shellQuote(path: string): string {
  return `'${path.replace(/'/g, `'\\''`)}'`;
}
