/** Benchmark plumbing: waiting for a stage to drain its input. */
import type { Bus } from '../../shared/bus.js';

export async function waitDrained(bus: Bus, stream: string, durable: string, timeoutMs = 600_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const info = await bus.jsm.consumers.info(stream, durable);
      if (info.num_pending === 0 && info.num_ack_pending === 0 && info.delivered.stream_seq > 0) return;
    } catch {
      // the stage has not created its consumer yet
    }
    if (Date.now() > deadline) throw new Error(`${stream}/${durable} did not drain in time`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
