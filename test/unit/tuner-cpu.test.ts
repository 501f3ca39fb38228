/** Which processes the tuner counts as the handoff's own CPU. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ownProcesses, type ProcessInfo } from '../../services/tuner/cpu.js';

const ROOT = '/srv/checkout';
const same = (path: string): string => path;
const own = (processes: ProcessInfo[]): string[] => [...ownProcesses(processes, ROOT, same)].sort();
const proc = (pid: number, argv: string[], options: { ppid?: number; cwd?: string } = {}): ProcessInfo => ({ pid: String(pid), ppid: options.ppid ?? 1, argv, cwd: options.cwd ?? '/' });

describe("the handoff's own processes", () => {
  test("this checkout's CLI counts: its actors, a command, run by absolute or relative path", () => {
    assert.deepEqual(
      own([
        proc(10, ['/usr/bin/node', `${ROOT}/dist/cli/main.js`, 'actor', 'delta', '--nats', 'nats://127.0.0.1:4222']),
        proc(11, ['node', '--cpu-prof', `${ROOT}/dist/cli/main.js`, 'actor', 'compress']),
        proc(12, ['node', 'bin/handoff.js', 'migrate'], { cwd: ROOT }),
        proc(13, ['node', '../cli/main.js', 'receive'], { cwd: `${ROOT}/dist/test` }),
      ]),
      ['10', '11', '12', '13'],
    );
  });

  test('a program whose command line only says "handoff" does not count, nor another checkout\'s handoff', () => {
    assert.deepEqual(
      own([
        proc(20, ['my-handoff-notes', '--edit']),
        proc(21, ['vim', '/home/me/handoff/TODO.md']),
        proc(22, ['node', '/home/me/cloudlet-handoff/dist/cli/main.js', 'actor', 'tuner']),
        proc(23, ['node', 'dist/cli/main.js', 'actor', 'sender'], { cwd: '/home/me/other-checkout' }),
        // this checkout's other scripts are not its actors (a test run, the ratio probe's process)
        proc(24, ['node', '--test', 'dist/test/pipeline.test.js'], { cwd: ROOT }),
        proc(25, ['node', `${ROOT}/dist/services/tuner/probe-process.js`]),
      ]),
      [],
    );
  });

  test('a nats-server counts where a process running this checkout started it', () => {
    assert.deepEqual(
      own([
        proc(30, ['node', `${ROOT}/bin/handoff.js`, 'migrate']),
        proc(31, ['nats-server', '-c', '/tmp/handoff-nats-1/nats.conf'], { ppid: 30 }),
        // a test process starts one for its own cloudlets
        proc(32, ['node', '--test', 'dist/test/faults.test.js'], { cwd: ROOT }),
        proc(33, ['/usr/sbin/nats-server', '-c', '/tmp/handoff-nats-2/nats.conf'], { ppid: 32 }),
        // one someone else runs
        proc(34, ['nats-server', '-js'], { ppid: 1 }),
        proc(35, ['nats-server', '-c', '/tmp/handoff-nats-3/nats.conf'], { ppid: 22 }),
      ]),
      ['30', '31', '33'],
    );
  });
});
