/**
 * CPU cgroups for a benchmark: tenants of one cloudlet (the handoff's container and another's)
 * that the scheduler shares a core between by weight, as container runtimes set them up, rather
 * than by how many tasks each has runnable. cgroup v1's cpu controller or v2's; needs root. Each
 * group is made here and removed by `destroy` once its processes have ended.
 */
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface CpuGroups {
  /** a command prefix that runs what follows in group `name` (its children stay in it) */
  prefix(name: string): string[];
  destroy(): void;
}

/** The cpu controller's root directory where groups can be made: v1's `cpu` hierarchy, or v2 with cpu enabled. */
function cpuRoot(): { dir: string; weightFile: string } {
  for (const dir of ['/sys/fs/cgroup/cpu', '/sys/fs/cgroup/cpu,cpuacct']) {
    if (existsSync(join(dir, 'cpu.shares'))) return { dir, weightFile: 'cpu.shares' };
  }
  const v2 = '/sys/fs/cgroup';
  const controllers = existsSync(join(v2, 'cgroup.controllers')) ? readFileSync(join(v2, 'cgroup.controllers'), 'utf8') : '';
  if (controllers.split(/\s+/).includes('cpu')) {
    // v2 gives a controller to children only when the parent enables it
    writeFileSync(join(v2, 'cgroup.subtree_control'), '+cpu');
    return { dir: v2, weightFile: 'cpu.weight' };
  }
  throw new Error('no cgroup cpu controller to make groups in (neither v1 /sys/fs/cgroup/cpu nor v2 with cpu)');
}

/**
 * A group for each name, with its relative CPU weight (`{ handoff: 1, hog: 2 }`: the hog gets two
 * thirds of a core both want), named after `tag` so parallel benchmarks do not meet.
 */
export function createCpuGroups(weights: Readonly<Record<string, number>>, tag = String(process.pid)): CpuGroups {
  const names = Object.keys(weights);
  for (const [name, w] of Object.entries(weights)) if (!(w > 0)) throw new Error(`CPU group ${name}: weight must be above 0 (got ${w})`);
  const root = cpuRoot();
  const dirOf = (name: string): string => join(root.dir, `handoff-bench-${tag}-${name}`);
  const destroy = (): void => {
    for (const name of names) {
      try {
        rmdirSync(dirOf(name));
      } catch {
        // not made, or a process still in it: rmdir refuses a group that holds one, and it stays
      }
    }
  };
  try {
    for (const name of names) {
      mkdirSync(dirOf(name));
      // relative to the default weight (v1 1024, v2 100), written so a parent's setting does not decide it
      const base = root.weightFile === 'cpu.shares' ? 1024 : 100;
      writeFileSync(join(dirOf(name), root.weightFile), String(Math.max(1, Math.round(base * weights[name]!))));
    }
  } catch (err) {
    destroy(); // the groups made before the one that failed
    throw err;
  }
  return {
    prefix(name: string): string[] {
      if (!names.includes(name)) throw new Error(`no CPU group ${name}`);
      // the shell moves itself into the group, then becomes the command
      return ['sh', '-c', `echo $$ > ${join(dirOf(name), 'cgroup.procs')} && exec "$@"`, 'sh'];
    },
    destroy,
  };
}
