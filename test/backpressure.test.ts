/**
 * Backpressure through a short wire queue on a slow link: the stages before it wait for room, which
 * each ack's announcement gives (shared/bus/room.ts), and nothing is lost or reordered wrongly.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { connectBus } from '../shared/bus/bus.js';
import { hashImageFile as sha256File } from '../shared/image/pages.js';
import { startEmbeddedNats, type EmbeddedNats } from '../shared/bus/nats-server.js';
import { handoff, makeWorkspace, type Workspace } from './helpers/cloudlets.js';

let ws: Workspace;
let nats: EmbeddedNats;
before(async () => {
  ws = await makeWorkspace(4 << 20, 4 << 20, 5);
  nats = await startEmbeddedNats();
});
after(async () => {
  await nats.stop();
  await ws.cleanup();
});

describe('backpressure', { timeout: 120_000 }, () => {
  test('a wire queue of two chunks on an 8 Mbit/s link: every ack is announced, images identical', async () => {
    // the streams are made by the first to connect (this test), at this size; the sender keeps it
    // (it resizes the queue only where this is unset)
    const chunkPages = 16;
    process.env.HANDOFF_WIRE_STREAM_MAX_BYTES = String(2 * chunkPages * 4096 + 8192);
    const bus = await connectBus(nats.url, 'backpressure-test');
    const nc = bus.nc;
    const announced = new Map<string, number>();
    nc.subscribe('handoff.room.>', { callback: (_err, msg) => void announced.set(msg.subject, (announced.get(msg.subject) ?? 0) + 1) });
    await nc.flush();
    try {
      const { summary, dest } = await handoff(ws, { natsUrl: nats.url, chunkPages, bandwidthCapBps: 8e6, mode: { delta: 'none', compressor: 'none', level: 0 } });
      assert.equal(summary.verified, true, `not verified: ${summary.reason}`);
      assert.equal(await sha256File(join(dest.outDir, 'memory.img')), await sha256File(ws.images.memory));
      assert.equal(await sha256File(join(dest.outDir, 'disk.img')), await sha256File(ws.images.disk));
      // the queue was short next to what went through it: its publishers waited for room
      assert.ok(summary.wireBytes > 8 * Number(process.env.HANDOFF_WIRE_STREAM_MAX_BYTES), `only ${summary.wireBytes} bytes went to the wire`);
      await nc.flush();
      // dedup's chunks went to the wire queue (raw: no delta, no compression); each ack was announced
      assert.equal(announced.get('handoff.room.wire'), summary.stages.sender!.chunks);
      assert.equal(announced.get('handoff.room.dedup'), summary.stages.dedup!.chunks);
    } finally {
      delete process.env.HANDOFF_WIRE_STREAM_MAX_BYTES;
      await bus.close();
    }
  });
});
