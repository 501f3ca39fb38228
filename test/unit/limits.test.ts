/** The sizes that must fit one another: max_payload everywhere, the device state in its event and frame. */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';
import { CAPTURED_EVENT_OVERHEAD_BYTES, MAX_DEVICE_STATE_CHARS, NATS_MAX_PAYLOAD_BYTES } from '../../shared/config/limits.js';
import { DeviceStateTooLargeError, encodeEvent, parseEvent, type MigrationEvent, type RoundRecord } from '../../shared/model/migration.js';
import { FRAME_HEADER_BYTES, FrameReader, FrameType, MAX_FRAME_PAYLOAD, encodeJsonFrame, parseCaptured } from '../../shared/wire/frames.js';

const NATS_CONF_DIR = fileURLToPath(new URL('../../../infra/nats/', import.meta.url));
const HASH = 'ab'.repeat(32);

/** nats-server's size units: KB, MB, GB are powers of 2 (as v2.9 reads them) */
function natsSize(text: string): number {
  const m = /^(\d+)\s*(KB|MB|GB|K|M|G)?$/i.exec(text.trim());
  assert.ok(m, `not a size: ${text}`);
  const unit = (m[2] ?? '').toUpperCase().replace(/B$/, '');
  return Number(m[1]) * ({ '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30 } as Record<string, number>)[unit]!;
}

/** a final captured event as large as it gets: the largest device state, and many rounds' records */
function largestCaptured(deviceStateChars: number): Extract<MigrationEvent, { type: 'captured' }> {
  const rounds: RoundRecord[] = Array.from({ length: 100 }, (_, round) => ({ round, dirtyPages: 4_294_967_295, seconds: 12345.678, decision: 'stop-and-copy', predictedDowntimeMs: 123456.789 }));
  return {
    type: 'captured',
    round: 65534,
    slices: Number.MAX_SAFE_INTEGER,
    imageHashes: { memory: HASH, disk: HASH },
    dirtyPages: Number.MAX_SAFE_INTEGER,
    scannedBytes: Number.MAX_SAFE_INTEGER,
    final: true,
    deviceState: 'A'.repeat(deviceStateChars),
    stoppedAtMs: Date.now(),
    rounds,
  };
}

describe('limits', () => {
  test('every nats-server config in infra/nats/ has the max_payload the code sizes for', () => {
    const confs = readdirSync(NATS_CONF_DIR).filter((f) => f.endsWith('.conf'));
    assert.ok(confs.length >= 2, `configs in ${NATS_CONF_DIR}: ${confs.join(', ')}`);
    for (const conf of confs) {
      const m = /^\s*max_payload\s*[:=]\s*(\S+)\s*$/m.exec(readFileSync(`${NATS_CONF_DIR}/${conf}`, 'utf8'));
      assert.ok(m, `${conf} sets no max_payload (the server's default is 1 MiB)`);
      assert.equal(natsSize(m[1]!), NATS_MAX_PAYLOAD_BYTES, conf);
    }
  });

  test('the largest device state accepted fits the NATS message that carries it, and the frame after it', () => {
    assert.equal(MAX_DEVICE_STATE_CHARS + CAPTURED_EVENT_OVERHEAD_BYTES, NATS_MAX_PAYLOAD_BYTES);
    const event = largestCaptured(MAX_DEVICE_STATE_CHARS);
    const data = encodeEvent(event);
    assert.ok(data.byteLength <= NATS_MAX_PAYLOAD_BYTES, `${data.byteLength} bytes > max_payload ${NATS_MAX_PAYLOAD_BYTES}`);
    assert.equal((parseEvent(data) as typeof event).deviceState?.length, MAX_DEVICE_STATE_CHARS);
    // the sender forwards it to the destination in a captured frame
    const frame = encodeJsonFrame(FrameType.Captured, { round: event.round, slices: 1, imageHashes: event.imageHashes, final: true, deviceState: event.deviceState });
    assert.ok(frame.byteLength - FRAME_HEADER_BYTES <= MAX_FRAME_PAYLOAD);
    const [read] = new FrameReader().push(frame);
    assert.equal(parseCaptured(read!).deviceState?.length, MAX_DEVICE_STATE_CHARS);
  });

  test('a larger device state is refused when its event is made, with the sizes', () => {
    assert.throws(
      () => encodeEvent(largestCaptured(MAX_DEVICE_STATE_CHARS + 1)),
      (err: unknown) =>
        err instanceof DeviceStateTooLargeError &&
        err.message.includes(String(MAX_DEVICE_STATE_CHARS + 1)) &&
        err.message.includes(String(MAX_DEVICE_STATE_CHARS)) &&
        err.message.includes(String(NATS_MAX_PAYLOAD_BYTES)),
    );
    // and one that came anyway is malformed at the other end
    const tooLarge = Buffer.from(JSON.stringify(largestCaptured(MAX_DEVICE_STATE_CHARS + 1)));
    assert.throws(() => parseEvent(tooLarge), /deviceState/);
    const frame = encodeJsonFrame(FrameType.Captured, { round: 1, slices: 1, imageHashes: { memory: HASH, disk: HASH }, deviceState: 'A'.repeat(MAX_DEVICE_STATE_CHARS + 1) });
    assert.throws(() => parseCaptured(new FrameReader().push(frame)[0]!), /deviceState/);
  });
});
