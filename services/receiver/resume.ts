/**
 * The destination's VM: QEMU started with `-incoming defer` on the images being rebuilt as soon as
 * the migration is accepted (its start-up then costs no downtime), the device state loaded once
 * the images are verified, and `cont` only when the source says go: the source is stopped for good
 * by then, so there are never two running copies.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { decodePatch } from '../../shared/codecs/patch.js';
import type { Logger } from '../../shared/telemetry/log.js';
import { loadDeviceState, startQemu, type RunningVm, type VmDescription } from '../../shared/vm/qemu.js';

/** What a destination needs to resume VMs: the base VM's kernel, initrd and device state. */
export interface ResumeOptions {
  kernel: string;
  initrd: string;
  baseDeviceState: string;
}

export interface ResumedVm {
  pid: number | undefined;
  qmpSocket: string;
  serialLog: string;
}

/** A destination VM waiting for its state: the shared-file one here, the source's own machine in stream-resumer.ts. */
export interface DestinationVm {
  readonly info: ResumedVm;
  /** loads the source's device state (encoded against the base's); the guest stays stopped */
  load(deviceStatePatch: string): Promise<void>;
  /** runs the guest (once; a repeated go gets the same answer) */
  resume(): Promise<number>;
  abort(): Promise<void>;
}

export class VmResumer implements DestinationVm {
  private resumedAtMs: number | undefined;

  private constructor(
    private readonly vm: RunningVm,
    /** the base's device state, read ahead: loading the source's is downtime */
    private readonly baseDeviceState: Buffer,
    private readonly dir: string,
    private readonly log: Logger,
  ) {}

  /** Starts the destination's QEMU, waiting for its device state, on the (partial) rebuilt images. */
  static async prepare(description: VmDescription, options: ResumeOptions, images: { memory: string; disk: string }, dir: string, log: Logger): Promise<VmResumer> {
    const baseDeviceState = await readFile(options.baseDeviceState);
    const vm = await startQemu(
      description,
      { memoryFile: images.memory, disk: images.disk, kernel: options.kernel, initrd: options.initrd, qmpSocket: join(dir, 'qmp.sock'), serialLog: join(dir, 'serial.log') },
      // the VM outlives this receiver process
      { incoming: true, detached: true },
    );
    log.info('destination VM started, waiting for its state', { pid: vm.child.pid });
    return new VmResumer(vm, baseDeviceState, dir, log);
  }

  get info(): ResumedVm {
    return { pid: this.vm.child.pid, qmpSocket: this.vm.paths.qmpSocket, serialLog: this.vm.paths.serialLog };
  }

  /** Loads the source's device state (encoded against the base's). */
  async load(deviceStatePatch: string): Promise<void> {
    const state = decodePatch(Buffer.from(deviceStatePatch, 'base64'), this.baseDeviceState);
    const file = join(this.dir, 'device-state.bin');
    await writeFile(file, state);
    await loadDeviceState(this.vm.qmp, file);
    this.log.info('device state loaded: ready to resume', { bytes: state.byteLength });
  }

  /** Runs the guest (once; a repeated go gets the same answer). */
  async resume(): Promise<number> {
    if (this.resumedAtMs === undefined) {
      await this.vm.qmp.execute('cont');
      this.resumedAtMs = Date.now();
      this.log.info('destination VM resumed');
      this.vm.qmp.close();
    }
    return this.resumedAtMs;
  }

  async abort(): Promise<void> {
    await this.vm.kill();
  }
}
