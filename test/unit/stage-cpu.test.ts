/** The CPU a stage reports per chunk: no CPU counted twice when chunks are in flight together; the codec's thread timed alone. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { CpuAccount } from '../../shared/cpu/cpu-account.js';
import { threadCpuMs } from '../../shared/cpu/thread-cpu.js';

describe('CPU per chunk', () => {
  test('two chunks in flight: the second counts from where the first finished, the sum is what was spent', () => {
    let cpuMs = 0;
    const account = new CpuAccount(() => cpuMs);
    const a = account.start();
    const b = account.start(); // received while a is being compressed
    cpuMs += 100; // a's compression
    assert.equal(account.finish(a), 100);
    cpuMs += 100; // b's
    assert.equal(account.finish(b), 100, 'b counted a as well');
    // one at a time, as before: from its own start (time between chunks is nobody's)
    cpuMs += 30; // idle work between chunks
    const c = account.start();
    cpuMs += 40;
    assert.equal(account.finish(c), 40);
  });

  test("the codec's thread CPU grows with its work and not with another thread's", async () => {
    const before = threadCpuMs();
    assert.ok(before !== undefined, '/proc/thread-self/schedstat unreadable on Linux');
    // spinning: the figure must reach 20 ms (however long a busy machine takes to give it that)
    const giveUpAt = performance.now() + 10_000;
    while (threadCpuMs()! - before < 20 && performance.now() < giveUpAt);
    assert.ok(threadCpuMs()! - before >= 20, 'ten seconds of spinning did not read as 20 ms of CPU');
    // waiting (the event loop idle) takes no CPU of this thread
    const idleFrom = threadCpuMs()!;
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.ok(threadCpuMs()! - idleFrom < 25, 'idle time counted as CPU');
  });
});
