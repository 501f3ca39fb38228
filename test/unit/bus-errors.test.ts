/** A refused publish is told apart by the client's error class and JetStream's error code, not by its text. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { JetStreamApiError } from '@nats-io/jetstream';
import { ClosedConnectionError, InvalidArgumentError, TimeoutError } from '@nats-io/transport-node';
import { isStreamFull, isTransient } from '../../shared/bus/bus.js';

type Kind = 'full' | 'transient' | 'neither';

/** JetStream's refusals as the server sends them: [HTTP-like status, err_code, description, what a publisher makes of it] */
const API_ERRORS: [number, number, string, Kind][] = [
  [503, 10077, 'maximum bytes exceeded', 'full'],
  [503, 10077, 'maximum messages exceeded', 'full'],
  [503, 10077, 'maximum messages per subject exceeded', 'full'],
  [503, 10077, 'write /data/jetstream/x.blk: no space left on device', 'full'],
  [500, 10047, 'insufficient storage resources available', 'full'],
  [500, 10028, 'insufficient memory resources available', 'full'],
  [503, 10023, 'insufficient resources', 'full'],
  [400, 10002, 'resource limits exceeded for account', 'full'],
  [404, 10059, 'stream not found', 'transient'],
  [503, 10039, 'JetStream not enabled for account', 'transient'],
  [503, 10076, 'JetStream not enabled', 'transient'],
  [503, 10008, 'JetStream system temporarily unavailable', 'transient'],
  [500, 10009, 'JetStream cluster can not handle request', 'transient'],
  [400, 10054, 'message size exceeds maximum allowed', 'neither'],
  [503, 10077, 'store is closed', 'neither'],
];

/** the client's JetStreamNotEnabled (no one answered for the stream), whose class it does not export */
function jetStreamNotEnabled(): Error {
  const err = new Error('jetstream is not enabled');
  err.name = 'JetStreamNotEnabled';
  return err;
}

function kindOf(err: unknown): Kind {
  const full = isStreamFull(err);
  const transient = isTransient(err);
  assert.ok(!(full && transient), `${String(err)} is both full and transient`);
  return full ? 'full' : transient ? 'transient' : 'neither';
}

describe('refused publishes', () => {
  test('by JetStream error code: a stream or store without room is full, JetStream away is transient', () => {
    for (const [status, errCode, description, kind] of API_ERRORS) {
      assert.equal(kindOf(new JetStreamApiError({ code: status, err_code: errCode, description })), kind, `${errCode} ${description}`);
    }
  });

  test('by the client\'s class: a timeout or no responders is transient, a closed connection or an oversize payload neither', () => {
    assert.equal(kindOf(new TimeoutError()), 'transient');
    assert.equal(kindOf(jetStreamNotEnabled()), 'transient');
    assert.equal(kindOf(new ClosedConnectionError()), 'neither');
    assert.equal(kindOf(new InvalidArgumentError("'payload' max_payload size exceeded")), 'neither');
  });

  test('the text alone makes nothing full or transient', () => {
    for (const err of [new Error('maximum bytes exceeded'), new Error('10047'), new Error('timeout'), new Error('stream not found'), 'maximum bytes exceeded']) assert.equal(kindOf(err), 'neither', String(err));
  });
});
