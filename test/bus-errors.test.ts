/** The server's own refusals of a publish classify as shared/bus/bus.ts expects (codes and classes of the installed client). */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { DiscardPolicy, RetentionPolicy, StorageType } from '@nats-io/jetstream';
import { connectBus, isStreamFull, isTransient, type Bus } from '../shared/bus/bus.js';
import { startEmbeddedNats, type EmbeddedNats } from '../shared/bus/nats-server.js';

let nats: EmbeddedNats;
let bus: Bus;
before(async () => {
  nats = await startEmbeddedNats();
  bus = await connectBus(nats.url, 'bus-errors-test');
});
after(async () => {
  await bus.close();
  await nats.stop();
});

async function refusal(publish: () => Promise<unknown>): Promise<unknown> {
  try {
    await publish();
  } catch (err) {
    return err;
  }
  assert.fail('the publish was not refused');
}

describe('refusals from nats-server', { timeout: 60_000 }, () => {
  test('a full stream (bytes, messages) is full; a message over the stream\'s size is neither', async () => {
    await bus.jsm.streams.add({ name: 'T_BYTES', subjects: ['t.bytes'], retention: RetentionPolicy.Workqueue, storage: StorageType.Memory, max_bytes: 10_000, discard: DiscardPolicy.New });
    await bus.jsm.streams.add({ name: 'T_MSGS', subjects: ['t.msgs'], retention: RetentionPolicy.Workqueue, storage: StorageType.Memory, max_msgs: 1, discard: DiscardPolicy.New });
    await bus.jsm.streams.add({ name: 'T_SIZE', subjects: ['t.size'], storage: StorageType.Memory, max_msg_size: 100 });
    const bytes = await refusal(async () => {
      for (let i = 0; i < 10; i++) await bus.js.publish('t.bytes', new Uint8Array(4000));
    });
    assert.equal(isStreamFull(bytes), true, String(bytes));
    const msgs = await refusal(async () => {
      for (let i = 0; i < 3; i++) await bus.js.publish('t.msgs', new Uint8Array(10));
    });
    assert.equal(isStreamFull(msgs), true, String(msgs));
    const size = await refusal(() => bus.js.publish('t.size', new Uint8Array(1000)));
    assert.equal(isStreamFull(size) || isTransient(size), false, String(size));
  });

  test('a subject no stream answers for is transient (JetStream starting after a restart looks the same)', async () => {
    const err = await refusal(() => bus.js.publish('t.nostream', new Uint8Array(1), { timeout: 2000 }));
    assert.equal(isTransient(err), true, String(err));
    assert.equal(isStreamFull(err), false, String(err));
  });
});
