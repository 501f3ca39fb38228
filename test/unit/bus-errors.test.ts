/** A refused publish is told apart by the client's error class and JetStream's error code, not by its text. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { JetStreamApiError } from '@nats-io/jetstream';
import { ClosedConnectionError, InvalidArgumentError, TimeoutError } from '@nats-io/transport-node';
import { isStreamFull, isTransient } from '../../shared/bus/bus.js';

const apiError = (status: number, errCode: number, description: string): JetStreamApiError => new JetStreamApiError({ code: status, err_code: errCode, description });

/** the client's JetStreamNotEnabled (no one answered for the stream), whose class it does not export */
function jetStreamNotEnabled(): Error {
  const err = new Error('jetstream is not enabled');
  err.name = 'JetStreamNotEnabled';
  return err;
}

describe('refused publishes', () => {
  test('a stream at its limits, or a server out of storage, is full', () => {
    for (const err of [
      apiError(503, 10077, 'maximum bytes exceeded'),
      apiError(503, 10077, 'maximum messages exceeded'),
      apiError(503, 10077, 'maximum messages per subject exceeded'),
      apiError(503, 10077, 'write /data/jetstream/x.blk: no space left on device'),
      apiError(500, 10047, 'insufficient storage resources available'),
      apiError(500, 10028, 'insufficient memory resources available'),
      apiError(503, 10023, 'insufficient resources'),
      apiError(400, 10002, 'resource limits exceeded for account'),
    ]) {
      assert.equal(isStreamFull(err), true, err.message);
      assert.equal(isTransient(err), false, err.message);
    }
  });

  test('the text alone makes nothing full or transient', () => {
    for (const err of [new Error('maximum bytes exceeded'), new Error('10047'), new Error('timeout'), new Error('stream not found'), 'maximum bytes exceeded']) {
      assert.equal(isStreamFull(err), false, String(err));
      assert.equal(isTransient(err), false, String(err));
    }
  });

  test('a server away, JetStream not answering or a stream not there yet is transient', () => {
    for (const err of [
      new TimeoutError(),
      jetStreamNotEnabled(),
      apiError(404, 10059, 'stream not found'),
      apiError(503, 10039, 'JetStream not enabled for account'),
      apiError(503, 10076, 'JetStream not enabled'),
      apiError(503, 10008, 'JetStream system temporarily unavailable'),
      apiError(500, 10009, 'JetStream cluster can not handle request'),
    ]) {
      assert.equal(isTransient(err), true, err.message);
      assert.equal(isStreamFull(err), false, err.message);
    }
  });

  test('other refusals are neither: the publish fails with them', () => {
    for (const err of [
      apiError(400, 10054, 'message size exceeds maximum allowed'),
      apiError(503, 10077, 'store is closed'),
      new InvalidArgumentError("'payload' max_payload size exceeded"),
      new ClosedConnectionError(),
    ]) {
      assert.equal(isStreamFull(err), false, err.message);
      assert.equal(isTransient(err), false, err.message);
    }
  });
});
