/**
 * The bus against a real nats-server: its refusals of a publish classify as shared/bus/bus.ts
 * expects (the installed client's classes and codes), and its max_payload is the one sizes derive from.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { DiscardPolicy, RetentionPolicy, StorageType } from '@nats-io/jetstream';
import { connectBus, dropMigrationWork, ensureMigrationWireConsumer, ensureWorkConsumer, isStreamFull, isTransient, publishEvent, type Bus } from '../shared/bus/bus.js';
import { STREAMS, migrationWireDurable, workSubject } from '../shared/bus/subjects.js';
import { MAX_DEVICE_STATE_CHARS, NATS_MAX_PAYLOAD_BYTES } from '../shared/config/limits.js';
import { DeviceStateTooLargeError, type MigrationEvent } from '../shared/model/migration.js';
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

const captured = (deviceStateChars: number): MigrationEvent => ({
  type: 'captured',
  round: 1,
  slices: 1,
  imageHashes: { memory: 'ab'.repeat(32), disk: 'ab'.repeat(32) },
  dirtyPages: 1,
  scannedBytes: 1,
  final: true,
  deviceState: 'A'.repeat(deviceStateChars),
});

describe('max_payload and the device state', { timeout: 60_000 }, () => {
  test('the embedded server takes NATS_MAX_PAYLOAD_BYTES, and the largest device state goes in one event', async () => {
    assert.equal(bus.maxPayloadBytes, NATS_MAX_PAYLOAD_BYTES);
    await publishEvent(bus, 'm-limits', captured(MAX_DEVICE_STATE_CHARS));
  });

  test('a larger one is refused with the sizes before anything is published', async () => {
    const before = (await bus.jsm.streams.info(STREAMS.events)).state.messages;
    await assert.rejects(publishEvent(bus, 'm-limits', captured(MAX_DEVICE_STATE_CHARS + 1)), (err: unknown) => err instanceof DeviceStateTooLargeError && err.message.includes(String(NATS_MAX_PAYLOAD_BYTES)));
    assert.equal((await bus.jsm.streams.info(STREAMS.events)).state.messages, before);
  });

  test('a server with a smaller max_payload: an event over it is refused with both sizes', async () => {
    const small = await startEmbeddedNats({ maxPayloadBytes: 1024 * 1024 });
    const smallBus = await connectBus(small.url, 'bus-limits-test');
    try {
      await assert.rejects(publishEvent(smallBus, 'm-limits', captured(2 * 1024 * 1024)), (err: unknown) => err instanceof Error && err.message.includes(String(1024 * 1024)) && err.message.includes(String(NATS_MAX_PAYLOAD_BYTES)));
    } finally {
      await smallBus.close();
      await small.stop();
    }
  });
});

// nats-server before 2.9.12 (Debian's is 2.9.10) moves every consumer whose filter covers a
// filtered purge's subject past the purged messages, skipping other subjects' messages between
// (nats-server #3838): a migration's end purging its chunks from a stage's shared stream had left
// another migration's chunk there, never delivered, and that handoff stalled for good.
describe('a migration that ends, beside another', { timeout: 60_000 }, () => {
  test('dropping its work leaves the other\'s chunks to the stages\' shared consumers and its own wire consumer', async () => {
    const durable = await ensureWorkConsumer(bus, 'delta', undefined, 10_000);
    await ensureMigrationWireConsumer(bus, 'm-kept', 10_000);
    for (const stage of ['delta', 'wire'] as const) {
      await bus.js.publish(workSubject(stage, 'm-kept'), new TextEncoder().encode(`kept ${stage}`));
      for (let i = 0; i < 3; i++) await bus.js.publish(workSubject(stage, 'm-ended'), new TextEncoder().encode(`ended ${stage} ${i}`));
    }
    await dropMigrationWork(bus, 'm-ended');
    const shared = await (await bus.js.consumers.get(STREAMS.delta, durable)).next({ expires: 2000 });
    assert.equal(shared?.subject, workSubject('delta', 'm-kept'), 'the kept migration\'s chunk is skipped by the stage\'s consumer');
    await shared.ackAck();
    const own = await (await bus.js.consumers.get(STREAMS.wire, migrationWireDurable('m-kept'))).next({ expires: 2000 });
    assert.equal(own?.subject, workSubject('wire', 'm-kept'));
    await own.ackAck();
    // the ended migration's wire chunks are gone (no consumer would take them); the stages drop its others as they come
    assert.equal(Object.keys((await bus.jsm.streams.info(STREAMS.wire, { subjects_filter: '>' })).state.subjects ?? {}).length, 0);
  });
});
