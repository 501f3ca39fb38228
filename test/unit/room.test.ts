/** A publisher to a full work stream waits for its consumer's announcement, not on a short timer. */
import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, mock, test } from 'node:test';
import { JetStreamApiError } from '@nats-io/jetstream';
import type { NatsConnection } from '@nats-io/transport-node';
import { publishWork, type Bus } from '../../shared/bus/bus.js';
import { ROOM_RECHECK_MAX_MS, ROOM_RECHECK_MS, ROOM_WAIT_MAX_MS, announceRoom } from '../../shared/bus/room.js';
import { eventSubject, workSubject } from '../../shared/bus/subjects.js';

/** A bus whose streams refuse every publish while `full`; core NATS delivers to subscriptions in this process. */
function fakeBus(): { bus: Bus; state: { full: boolean; attempts: number } } {
  const state = { full: true, attempts: 0 };
  const subscriptions = new Map<string, (() => void)[]>();
  const nc = {
    isClosed: () => false,
    subscribe: (subject: string, opts: { callback: () => void }) => {
      subscriptions.set(subject, [...(subscriptions.get(subject) ?? []), opts.callback]);
      return {};
    },
    publish: (subject: string) => {
      for (const callback of subscriptions.get(subject) ?? []) callback();
    },
  };
  const js = {
    publish: async () => {
      state.attempts++;
      if (state.full) throw new JetStreamApiError({ code: 503, err_code: 10077, description: 'maximum bytes exceeded' });
      return { seq: state.attempts };
    },
  };
  return { bus: { nc: nc as unknown as NatsConnection, js } as unknown as Bus, state };
}

/** lets the publisher's promises run (the timers are mocked, setImmediate is not) */
const settle = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe('room in a full work stream', () => {
  beforeEach(() => mock.timers.enable({ apis: ['setTimeout'] }));
  afterEach(() => mock.timers.reset());

  test('a refused publish tries again at the announcement of an ack, and meanwhile only every ROOM_WAIT_MAX_MS', async () => {
    const { bus, state } = fakeBus();
    let published = false;
    void publishWork(bus, workSubject('wire', 'm-room'), new Uint8Array(1000), 'm-room.1').then(() => (published = true));
    await settle();
    assert.equal(state.attempts, 1);
    mock.timers.tick(ROOM_WAIT_MAX_MS - 1);
    await settle();
    // every 5-20 ms before: five tries by now, each sending the whole chunk
    assert.equal(state.attempts, 1, 'tried again with no announcement before ROOM_WAIT_MAX_MS');
    mock.timers.tick(1);
    await settle();
    assert.equal(state.attempts, 2, 'no try after ROOM_WAIT_MAX_MS without an announcement');
    // another stage's consumer acked: no room in this stream
    announceRoom(bus.nc, 'dedup');
    await settle();
    assert.equal(state.attempts, 2, 'woken by another stream');
    state.full = false;
    announceRoom(bus.nc, 'wire');
    await settle();
    assert.equal(published, true, 'the announcement did not wake the publisher');
    assert.equal(state.attempts, 3);
  });

  test('refused again right after an announcement: again 5, 10 and 20 ms later, then it waits for the next', async () => {
    const { bus, state } = fakeBus();
    let published = false;
    void publishWork(bus, workSubject('wire', 'm-room'), new Uint8Array(1000), 'm-room.2').then(() => (published = true));
    await settle();
    announceRoom(bus.nc, 'wire'); // the server has not yet taken the acked message out
    await settle();
    assert.equal(state.attempts, 2);
    let waitedMs = 0;
    for (const recheckMs of [ROOM_RECHECK_MS, 2 * ROOM_RECHECK_MS, ROOM_RECHECK_MAX_MS]) {
      mock.timers.tick(recheckMs - 1);
      await settle();
      const attemptsBefore: number = state.attempts;
      mock.timers.tick(1);
      await settle();
      waitedMs += recheckMs;
      assert.equal(state.attempts, attemptsBefore + 1, `no try ${waitedMs} ms after the announcement`);
    }
    mock.timers.tick(ROOM_WAIT_MAX_MS - 1);
    await settle();
    assert.equal(state.attempts, 5, 'kept trying soon after the announcement');
    state.full = false;
    mock.timers.tick(1);
    await settle();
    assert.equal(published, true);
  });

  test('an event (no work stream, never full in practice) still gets published after a refusal', async () => {
    const { bus, state } = fakeBus();
    let published = false;
    void publishWork(bus, eventSubject('m-room', 'captured'), new Uint8Array(10)).then(() => (published = true));
    await settle();
    state.full = false;
    mock.timers.tick(ROOM_WAIT_MAX_MS);
    await settle();
    assert.equal(published, true);
    assert.equal(state.attempts, 2);
  });
});
