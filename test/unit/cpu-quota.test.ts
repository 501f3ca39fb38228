/** A CPU quota on a running process: into a cgroup of its own, capped, and back where it was. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { CpuQuota, cgroupOf, cpuController } from '../../shared/cpu/quota.js';
import { TICKS_PER_SECOND, readProcStat } from '../../shared/cpu/proc-stat.js';

describe('cpu quota', () => {
  test("reads the process's group from /proc/PID/cgroup, v1 and v2", () => {
    const v1 = '12:pids:/a\n4:cpu,cpuacct:/user.slice/x\n1:name=systemd:/init\n0::/v2path\n';
    assert.equal(cgroupOf(v1, 1), '/user.slice/x');
    assert.equal(cgroupOf(v1, 2), '/v2path');
    assert.throws(() => cgroupOf('1:name=systemd:/\n', 1), /no cpu cgroup line/);
  });

  test('moves the process into its own group, writes the quota, moves it home again (v1 layout)', () => {
    const root = mkdtempSync(join(tmpdir(), 'handoff-quota-'));
    try {
      mkdirSync(join(root, 'cgroup', 'cpu', 'home'), { recursive: true });
      writeFileSync(join(root, 'cgroup', 'cpu', 'cpu.cfs_quota_us'), '-1');
      mkdirSync(join(root, 'proc', '4242'), { recursive: true });
      writeFileSync(join(root, 'proc', '4242', 'cgroup'), '3:cpu,cpuacct:/home\n0::/\n');
      const quota = CpuQuota.take(4242, { cgroupRoot: join(root, 'cgroup'), procRoot: join(root, 'proc') });
      const own = join(root, 'cgroup', 'cpu', 'handoff-quota-4242');
      assert.equal(readFileSync(join(own, 'cgroup.procs'), 'utf8'), '4242');
      quota.limit(25);
      assert.equal(readFileSync(join(own, 'cpu.cfs_quota_us'), 'utf8'), '25000');
      assert.equal(readFileSync(join(own, 'cpu.cfs_period_us'), 'utf8'), '100000');
      assert.equal(quota.percent, 25);
      quota.release();
      assert.equal(readFileSync(join(root, 'cgroup', 'cpu', 'home', 'cgroup.procs'), 'utf8'), '4242');
      assert.equal(quota.percent, 100);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  const real = cpuController();
  test('caps a busy process on this machine', { skip: process.getuid?.() !== 0 ? 'needs root' : typeof real === 'string' ? real : false }, async () => {
    const busy = spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' });
    try {
      await new Promise((r) => setTimeout(r, 200));
      const quota = CpuQuota.take(busy.pid!);
      try {
        quota.limit(10);
        const before = readProcStat(busy.pid!)!;
        await new Promise((r) => setTimeout(r, 1000));
        const after = readProcStat(busy.pid!)!;
        const cpuSeconds = (after.utimeTicks + after.stimeTicks - before.utimeTicks - before.stimeTicks) / TICKS_PER_SECOND;
        // a tenth of a core for a second, with room for the scheduler's periods: never most of a core
        assert.ok(cpuSeconds < 0.35, `the capped process used ${cpuSeconds} s of CPU in 1 s`);
      } finally {
        quota.release();
      }
      assert.ok(!readFileSync(`/proc/${busy.pid}/cgroup`, 'utf8').includes('handoff-quota'), 'the process was not moved back');
    } finally {
      busy.kill('SIGKILL');
    }
  });
});
