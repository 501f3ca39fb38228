/**
 * A CPU quota on a running process (a source VM's QEMU): the process moved into a cgroup of its own
 * whose CFS quota caps the CPU it may use, and moved back where it was when the quota is lifted. A
 * guest that dirties memory faster than the link carries then dirties it more slowly, under TCG as
 * under KVM. cgroup v1's cpu controller or v2's; needs root.
 */
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/** the CFS period the quota is a share of */
const PERIOD_US = 100_000;

interface CpuController {
  root: string;
  version: 1 | 2;
}

/** Where cgroups with a cpu controller are made, or why there is none. */
export function cpuController(cgroupRoot = '/sys/fs/cgroup'): CpuController | string {
  for (const dir of [join(cgroupRoot, 'cpu'), join(cgroupRoot, 'cpu,cpuacct')]) {
    if (existsSync(join(dir, 'cpu.cfs_quota_us'))) return { root: dir, version: 1 };
  }
  const controllers = join(cgroupRoot, 'cgroup.controllers');
  if (existsSync(controllers) && readFileSync(controllers, 'utf8').split(/\s+/).includes('cpu')) return { root: cgroupRoot, version: 2 };
  return `no cgroup cpu controller under ${cgroupRoot} (v1 cpu/ or v2 with cpu)`;
}

/** The cgroup path (below the controller's root) that `pid` is in, from /proc/PID/cgroup. */
export function cgroupOf(procCgroup: string, version: 1 | 2): string {
  for (const line of procCgroup.split('\n')) {
    const [id, controllers, path] = line.split(':');
    if (path === undefined) continue;
    if (version === 2 ? id === '0' && controllers === '' : controllers!.split(',').includes('cpu')) return path;
  }
  throw new Error(`no ${version === 2 ? 'cgroup v2' : 'cpu cgroup'} line in /proc/PID/cgroup`);
}

export class CpuQuota {
  private sharePct = 100;

  private constructor(
    private readonly controller: CpuController,
    private readonly pid: number,
    /** the group the process came from, relative to the controller's root */
    private readonly home: string,
    private readonly dir: string,
  ) {}

  /** Moves `pid` into a group of its own (no quota yet). Throws, naming why, where it cannot. */
  static take(pid: number, options: { cgroupRoot?: string; procRoot?: string } = {}): CpuQuota {
    const controller = cpuController(options.cgroupRoot);
    if (typeof controller === 'string') throw new Error(controller);
    const home = cgroupOf(readFileSync(join(options.procRoot ?? '/proc', String(pid), 'cgroup'), 'utf8'), controller.version);
    const dir = join(controller.root, `handoff-quota-${pid}`);
    if (controller.version === 2) writeFileSync(join(controller.root, 'cgroup.subtree_control'), '+cpu');
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'cgroup.procs'), String(pid));
    return new CpuQuota(controller, pid, home, dir);
  }

  /** the share of one core the process may use now, in percent (100: no quota) */
  get percent(): number {
    return this.sharePct;
  }

  /** Caps the process at `percent` of one core. */
  limit(percent: number): void {
    const quotaUs = Math.max(1000, Math.round((PERIOD_US * percent) / 100));
    if (this.controller.version === 2) writeFileSync(join(this.dir, 'cpu.max'), `${quotaUs} ${PERIOD_US}`);
    else {
      writeFileSync(join(this.dir, 'cpu.cfs_period_us'), String(PERIOD_US));
      writeFileSync(join(this.dir, 'cpu.cfs_quota_us'), String(quotaUs));
    }
    this.sharePct = percent;
  }

  /** Lifts the quota: the process back in its own group (if it still runs), this group removed. */
  release(): void {
    try {
      writeFileSync(join(this.controller.root, this.home, 'cgroup.procs'), String(this.pid));
    } catch {
      // it has exited
    }
    try {
      rmdirSync(this.dir);
    } catch {
      // a process still in it (or a test's plain folder): left for the next release
    }
    this.sharePct = 100;
  }
}
