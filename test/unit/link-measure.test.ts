/** How the link's speed is measured: ACKs over the time the link had work, probes timed by the receiver. */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { ArrivalTimer } from '../../services/receiver/arrival.js';
import { BandwidthEstimator } from '../../services/sender/bandwidth.js';
import { STARVED_SENDER_SHARE, probeRound } from '../../services/sender/link-probe.js';
import { FrameReader, FrameType, encodeFrame, encodeProbeAckFrame, parseProbeAck } from '../../shared/wire/frames.js';
import { MalformedMessageError } from '../../shared/model/errors.js';

const MBIT = 1e6;
const near = (actual: number | undefined, expected: number, what: string): void => {
  assert.ok(actual !== undefined && Math.abs(actual / expected - 1) < 0.02, `${what}: ${actual} bit/s, expected ${expected}`);
};

describe('bandwidth from ACKs', () => {
  test('two ACKs answered together give no figure (they once read 30-60 Mbit/s on a 5 Mbit/s link)', () => {
    const e = new BandwidthEstimator();
    // 64 KiB frames at 5 Mbit/s: the link takes 105 ms each; the receiver read two in one go
    e.ack(64 * 1024, 0, 105);
    e.ack(64 * 1024, 0, 108);
    assert.equal(e.bandwidthBps, undefined);
    for (let i = 3; i <= 6; i++) e.ack(64 * 1024, 0, i * 105);
    near(e.bandwidthBps, 5 * MBIT, 'after 630 ms of link time');
  });

  test('time the link waited for the pipeline is not counted: the link rate, not the pipeline pace', () => {
    const e = new BandwidthEstimator();
    // a 25 Mbit/s link fed one 100 KB frame every 100 ms: busy 32 ms of each 100
    const frameBytes = 100_000;
    const carryMs = (frameBytes * 8) / 25_000; // 32 ms
    for (let i = 0; i < 20; i++) e.ack(frameBytes, i * 100, i * 100 + carryMs);
    near(e.bandwidthBps, 25 * MBIT, 'pipeline-bound');
    // ACK spacing would have said 8 Mbit/s (100 KB per 100 ms)
  });

  test('frames queued behind each other are timed from the previous ACK, not from their sending', () => {
    const e = new BandwidthEstimator();
    // ten 125 KB frames written at once to a 10 Mbit/s link: one ACK every 100 ms
    for (let i = 1; i <= 10; i++) e.ack(125_000, 0, i * 100);
    near(e.bandwidthBps, 10 * MBIT, 'backlogged');
  });

  test('the window forgets: a faster link shows within a second', () => {
    const e = new BandwidthEstimator();
    let t = 0;
    for (let i = 0; i < 30; i++) e.ack(62_500, t, (t += 100)); // 5 Mbit/s
    for (let i = 0; i < 10; i++) e.ack(437_500, t, (t += 100)); // 35 Mbit/s for a second
    near(e.bandwidthBps, 35 * MBIT, 'after the change');
  });

  test('a change of more than 2x shows after a quarter second of link time; a burst does not move it', () => {
    const e = new BandwidthEstimator();
    let t = 0;
    for (let i = 0; i < 30; i++) e.ack(62_500, t, (t += 100)); // 5 Mbit/s
    // a shaper's burst: 64 KiB more than the rate in one 100 ms ACK
    e.ack(62_500 + 65_536, t, (t += 100));
    for (let i = 0; i < 2; i++) e.ack(62_500, t, (t += 100));
    near(e.bandwidthBps, 5 * MBIT * (1 + 65_536 / 62_500 / 7), 'a burst: the 0.7 s figure');
    for (let i = 0; i < 3; i++) e.ack(43_750, t, (t += 10)); // 35 Mbit/s, 30 ms: not yet
    assert.ok(e.bandwidthBps! < 10 * MBIT);
    for (let i = 0; i < 25; i++) {
      e.ack(43_750, t, (t += 10));
      // from a quarter second on, the new rate, not an average that catches up over 0.7 s
      if (i >= 22) near(e.bandwidthBps, 35 * MBIT, `${(i + 4) * 10} ms after the change`);
    }
    // and back: a slower link shows as soon
    for (let i = 0; i < 3; i++) e.ack(62_500, t, (t += 100));
    near(e.bandwidthBps, 5 * MBIT, 'back to 5');
  });
});

describe('probe timing at the receiver', () => {
  test('bytes after the delivery that finished the lead, over the time between deliveries', () => {
    const a = new ArrivalTimer();
    // recorded on a 5 Mbit/s tbf link: the burst, then 64 KiB packets (one holds the lead's end
    // and 41 KB of the measured frame), the measured frame finishing 40.7 ms later
    a.read(53_576, 0.3);
    a.read(26_064, 26.4);
    a.read(34_752, 84.6);
    a.read(47_784, 181.5);
    assert.deepEqual(a.probeFinished(), { bytes: 0, spanMs: 0 }, 'the lead has nothing before it');
    a.read(2_896, 186.2);
    a.read(21_400, 222.2);
    const measured = a.probeFinished();
    assert.equal(measured.bytes, 24_296);
    assert.ok(Math.abs(measured.spanMs - 40.7) < 1e-9);
    const bps = (measured.bytes * 8 * 1000) / measured.spanMs;
    assert.ok(Math.abs(bps / (5 * MBIT) - 1) < 0.05, `${bps} bit/s`);
    // what the answers' spacing read: the whole 64 KiB frame in 40.7 ms
    assert.ok((64 * 1024 * 8 * 1000) / 40.7 > 12 * MBIT);
  });

  test('reads in one turn of the event loop are one delivery, however long their parsing took', () => {
    const a = new ArrivalTimer();
    a.read(16_384, 100);
    a.probeFinished(); // the lead ends in the first record
    a.read(16_384, 100.02, true); // the rest of the same packet: it took no link time after the lead
    a.read(16_384, 103, true); // parsing the records before took 3 ms
    a.read(65_536, 200);
    assert.deepEqual(a.probeFinished(), { bytes: 65_536, spanMs: 100 });
    // a fast flow: a packet every 0.5 ms, each in a turn of its own, is timed packet by packet
    a.read(65_536, 300);
    a.probeFinished();
    for (let i = 1; i <= 32; i++) a.read(65_536, 300 + i * 0.5);
    const fast = a.probeFinished();
    assert.equal(fast.bytes, 32 * 65_536);
    assert.equal(fast.spanMs, 16);
  });

  test('two probes finished by one delivery time nothing', () => {
    const a = new ArrivalTimer();
    a.read(200_000, 5);
    a.probeFinished();
    assert.deepEqual(a.probeFinished(), { bytes: 0, spanMs: 0 });
  });

  test('a probe answer carries the timing; a malformed one is refused by name', () => {
    const [frame] = new FrameReader().push(encodeProbeAckFrame(7, { bytes: 24_296, spanMs: 40.7 }));
    assert.deepEqual(parseProbeAck(frame!), { id: 7, bytes: 24_296, spanMs: 40.7 });
    const [short] = new FrameReader().push(encodeFrame(FrameType.ProbeAck, Buffer.alloc(4)));
    assert.throws(() => parseProbeAck(short!), (e: unknown) => e instanceof MalformedMessageError && /probe ack frame: 4 bytes/.test(e.message));
    const bad = Buffer.alloc(20);
    bad.writeDoubleLE(-1, 4);
    const [negative] = new FrameReader().push(encodeFrame(FrameType.ProbeAck, bad));
    assert.throws(() => parseProbeAck(negative!), /probe ack frame: bad timing/);
    // random timings: read or refused by name, never anything else
    for (let i = 0; i < 2000; i++) {
      const [f] = new FrameReader().push(encodeFrame(FrameType.ProbeAck, randomBytes(i % 3 === 0 ? i % 40 : 20)));
      try {
        const { bytes, spanMs } = parseProbeAck(f!);
        assert.ok(bytes >= 0 && spanMs >= 0 && Number.isFinite(bytes + spanMs));
      } catch (err) {
        assert.ok(err instanceof MalformedMessageError, String(err));
      }
    }
  });
});

describe("the link probe's rounds", () => {
  const MAX = 1024 * 1024;
  test('a frame timed over 10 ms or more is the answer; a quicker one asks for one that takes about 20 ms', () => {
    // 64 KiB in 105 ms: 5 Mbit/s
    assert.deepEqual(probeRound(1, 65_536, { bytes: 65_536, spanMs: 104.86 }, MAX).nextMeasuredBytes, undefined);
    // 100 Mbit/s: 64 KiB in 5.2 ms; next, 250 KB
    const r = probeRound(1, 65_536, { bytes: 65_536, spanMs: 5.24 }, MAX);
    near(r.bps, 100 * MBIT, 'the first round');
    assert.ok(r.nextMeasuredBytes! > 240_000 && r.nextMeasuredBytes! < 260_000, `next ${r.nextMeasuredBytes}`);
    // in one delivery: untimed, the largest frame next
    assert.equal(probeRound(1, 65_536, { bytes: 0, spanMs: 0 }, MAX).nextMeasuredBytes, MAX);
  });

  test('from the second round, a reading at which even the largest frame would cross within 10 ms ends it', () => {
    // 1000 Mbit/s as measured: the second round's 757 KB read 1.7 Gbit/s in 3.5 ms; 1 MiB would take 4.9 ms
    const second = probeRound(2, 757_734, { bytes: 757_750, spanMs: 3.52 }, MAX);
    assert.equal(second.nextMeasuredBytes, undefined);
    assert.ok(second.bps > 1e9);
    // the first round's reading of the same speed asks for another: its frame only followed the lead
    assert.equal(probeRound(1, 65_536, { bytes: 65_552, spanMs: 0.3 }, MAX).nextMeasuredBytes, MAX);
    // a second round reading 300 Mbit/s (1 MiB would take 28 ms) goes on, with 750 KB
    const next = probeRound(2, 250_000, { bytes: 250_000, spanMs: 6.67 }, MAX).nextMeasuredBytes;
    assert.ok(next !== undefined && next > 740_000 && next < 760_000, `next ${next}`);
  });

  test("a round whose sender waited for a core reads the sender's pace: scaled by the share it ran, at most twice", () => {
    // 1000 Mbit/s on a one-core source as measured: 390 KB in 18.5 ms, the sender waiting half the round
    const starved = probeRound(2, 390_661, { bytes: 390_677, spanMs: 18.47 }, MAX, 0.51);
    const plain = probeRound(2, 390_661, { bytes: 390_677, spanMs: 18.47 }, MAX);
    near(plain.bps, 169 * MBIT, 'as read');
    near(starved.bps, 2 * plain.bps, 'at most twice');
    near(probeRound(2, 390_661, { bytes: 390_677, spanMs: 18.47 }, MAX, 0.3).bps, plain.bps / 0.7, 'by the share it ran');
    // a sender that waited a few percent (as at 25 Mbit/s, not starved) reads the link as it is
    assert.equal(probeRound(1, 65_536, { bytes: 65_552, spanMs: 22 }, MAX, STARVED_SENDER_SHARE - 0.01).bps, probeRound(1, 65_536, { bytes: 65_552, spanMs: 22 }, MAX).bps);
  });

  test('a first round the sender waited through for more than half its time is followed by another, whatever its span', () => {
    // a one-core source: 64 KiB of a 1000 Mbit/s link in 16.44 ms with the sender waiting 86% (read 64 Mbit/s, scaled)
    const starved = probeRound(1, 65_536, { bytes: 65_552, spanMs: 16.44 }, MAX, 0.86);
    near(starved.bps, 63.8 * MBIT, 'scaled at most twice');
    // a frame twice the span at that reading: 160 KB
    assert.ok(starved.nextMeasuredBytes !== undefined && starved.nextMeasuredBytes > 155_000 && starved.nextMeasuredBytes < 165_000, `next ${starved.nextMeasuredBytes}`);
    // at half, the span over 10 ms decides as before; nor does a second round go on for starving
    assert.equal(probeRound(1, 65_536, { bytes: 65_552, spanMs: 16.44 }, MAX, 0.5).nextMeasuredBytes, undefined);
    assert.equal(probeRound(2, 163_000, { bytes: 163_016, spanMs: 20 }, MAX, 0.86).nextMeasuredBytes, undefined);
    // nor past the largest frame
    assert.equal(probeRound(1, MAX, { bytes: MAX, spanMs: 16.44 }, MAX, 0.86).nextMeasuredBytes, undefined);
  });
});
