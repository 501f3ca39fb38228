/**
 * A running test guest with a base snapshot, as a cloudlet would hold it: boots the guest (RAM in
 * a file), waits for its counter, then stops it, saves the device state, copies RAM and disk as the
 * base, and lets it run on. Both handoff tests and the VM benchmark start from here.
 */
import { copyFileSync, mkdirSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnReceiverProcess, type ReceiverProcess } from '../../cli/receive.js';
import { loadBaseIndex } from '../../shared/image/base-index.js';
import { buildGuest, type GuestFiles } from '../../shared/testdata/guest.js';
import { saveDeviceState, startQemu, type RunningVm, type VmDescription, type VmPaths } from '../../shared/vm/qemu.js';

export const GUEST_CACHE = fileURLToPath(new URL('../../../.handoff-cache/guest', import.meta.url));

export interface TestVm {
  vm: RunningVm;
  description: VmDescription;
  descriptionFile: string;
  paths: VmPaths;
  guest: GuestFiles;
  base: { memory: string; disk: string; deviceState: string };
}

export interface TestVmOptions {
  /** a command QEMU runs under, e.g. ['ip', 'netns', 'exec', NS] on the source host */
  prefix?: string[];
  /** tmpfs files the guest's writes rotate over: 1 (default) about 1 MiB of working set, 128 16 MiB */
  workingSetFiles?: number;
  memoryBytes?: number;
  diskBytes?: number;
}

export async function startTestVm(dir: string, options: TestVmOptions = {}): Promise<TestVm> {
  const { prefix, workingSetFiles = 1, memoryBytes = 256 << 20, diskBytes = 32 << 20 } = options;
  mkdirSync(dir, { recursive: true });
  const guest = buildGuest(GUEST_CACHE);
  const description: VmDescription = { memoryBytes, cpus: 1, append: `console=ttyS0 quiet panic=-1 handoff.files=${workingSetFiles}` };
  const descriptionFile = join(dir, 'vm.json');
  writeFileSync(descriptionFile, JSON.stringify(description));
  const paths: VmPaths = { memoryFile: join(dir, 'memory.ram'), disk: join(dir, 'disk.img'), kernel: guest.kernel, initrd: guest.initrd, qmpSocket: join(dir, 'qmp.sock'), serialLog: join(dir, 'serial.log') };
  for (const [file, bytes] of [[paths.memoryFile, memoryBytes], [paths.disk, diskBytes]] as const) {
    writeFileSync(file, '');
    truncateSync(file, bytes);
  }
  const vm = await startQemu(description, paths, prefix ? { prefix } : {});
  try {
    await vm.waitCounter(3);
    // the base snapshot: what every cloudlet holds of this VM
    const base = { memory: join(dir, 'base-memory.img'), disk: join(dir, 'base-disk.img'), deviceState: join(dir, 'base-device-state.bin') };
    await vm.qmp.execute('stop');
    await saveDeviceState(vm.qmp, base.deviceState);
    copyFileSync(paths.memoryFile, base.memory);
    copyFileSync(paths.disk, base.disk);
    await vm.qmp.execute('cont');
    // the capture actor takes the QMP socket (one client at a time) for the stop
    vm.qmp.close();
    // a cloudlet holds its base VM indexed (the index is cached beside it, keyed by content)
    await Promise.all([loadBaseIndex(base.memory), loadBaseIndex(base.disk)]);
    return { vm, description, descriptionFile, paths, guest, base };
  } catch (err) {
    await vm.kill();
    throw err;
  }
}

/** The destination cloudlet's copy of the base VM (kernel and initrd are part of it too). */
export function destinationBase(vm: TestVm, dir: string): { memory: string; disk: string; deviceState: string } {
  mkdirSync(dir, { recursive: true });
  const base = { memory: join(dir, 'base-memory.img'), disk: join(dir, 'base-disk.img'), deviceState: join(dir, 'base-device-state.bin') };
  copyFileSync(vm.base.memory, base.memory);
  copyFileSync(vm.base.disk, base.disk);
  copyFileSync(vm.base.deviceState, base.deviceState);
  return base;
}

/** `handoff migrate` arguments for a live handoff of the test VM. */
export function liveMigrateArgs(vm: TestVm, to: string, extra: string[] = []): string[] {
  return [
    ...['--qmp', vm.paths.qmpSocket, '--memory', vm.paths.memoryFile, '--disk', vm.paths.disk],
    ...['--base-memory', vm.base.memory, '--base-disk', vm.base.disk, '--base-device-state', vm.base.deviceState],
    ...['--vm-description', vm.descriptionFile, '--to', to, '--mode', 'zstd:3'],
    ...extra,
  ];
}

/**
 * The destination cloudlet of a VM handoff: its copy of the base VM, and `handoff receive
 * --resume-vm` in the destination namespace (`prefix`), listening on `listen`.
 */
export async function spawnVmDestination(vm: TestVm, dir: string, listen: string, prefix: string[], ownProcessGroup = false): Promise<ReceiverProcess> {
  const base = destinationBase(vm, join(dir, 'base'));
  return spawnReceiverProcess({
    baseMemory: base.memory,
    baseDisk: base.disk,
    outDir: join(dir, 'out'),
    listen,
    prefix,
    vm: { kernel: vm.guest.kernel, initrd: vm.guest.initrd, baseDeviceState: base.deviceState },
    ownProcessGroup,
    forwardLogs: process.env.HANDOFF_LOG_LEVEL === 'info' || process.env.HANDOFF_LOG_LEVEL === 'debug',
  });
}
