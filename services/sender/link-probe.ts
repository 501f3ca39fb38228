/**
 * The link probe's rounds (WanLink.probe sends them): what a round's answer reads, and whether a
 * larger measured frame, one more round, could read more.
 */
import type { ProbeArrival } from '../../shared/wire/frames.js';

/** the receiver's timing of a probe frame is trusted from this span (below, a larger frame follows) */
export const PROBE_MIN_SPAN_MS = 10;

/**
 * A sender that waited for a core this share of a round or more (runnable, not running: the
 * actors start their work at the accept, on the same cores) set the frame's pace, not the link:
 * on a one-core source its rounds waited 46-55% of the time and read a 1000 Mbit/s link as 169-324
 * Mbit/s (at 169 the tuner took raw for link-bound and kept patch-3, 20% slower there), 100 as 75-78.
 * Rounds that were not starved waited 2-8%. Such a reading is scaled by the share of the round the
 * sender ran, as if the link had idled while it waited, at most twice: data already queued kept it
 * busy then (scaled, 1000 Mbit/s read 542-589 and 100 read 118-166). The ACKs of chunks measure
 * the link properly later. A first round the sender waited through for more than MAX_STARVED_SHARE
 * reads too little of the link to scale: one more round follows (see probeRound).
 */
export const STARVED_SENDER_SHARE = 0.25;
const MAX_STARVED_SHARE = 0.5;

export interface ProbeRound {
  /** what this round reads (bits/s), scaled where the sender was starved */
  bps: number;
  /** the next round's measured frame; undefined: this reading is the answer */
  nextMeasuredBytes?: number;
}

/**
 * Round `round` (from 1) timed a frame of `measuredBytes`. Another round follows when the frame
 * crossed within the shortest span worth timing, with a frame that takes about twice that span at
 * the speed this one suggests (one more round, not a ladder of them: each megabyte of padding is
 * CPU on a fast link), up to `maxMeasuredBytes`. From the second round on, a reading at which even
 * that largest frame would cross within the span ends it too: no round could time it, and such a
 * reading is low if anything (at 1000 Mbit/s the receiver set the pace: a second round of 342-757 KB read
 * 1.7-4.8 Gbit/s, and a third of 1 MiB 1.2-5.5 Gbit/s, 10-15 ms later, while capture waited for the look).
 * The first round's frame follows a lead sized for a shaper's burst, not for the reading: its
 * reading alone decides nothing of the kind. `senderWaitShare`: the share of the round the sender
 * waited for a core (see STARVED_SENDER_SHARE). A first round it waited through for more than
 * MAX_STARVED_SHARE is followed by another, whatever its span: on a one-core source a first round
 * that waited 86% read 1000 Mbit/s as 64 Mbit/s (scaled twice), in a span over 10 ms, and ended the
 * probe there; the tuner kept patch-3 and the handoff took 2.77 s of transfer against raw's 2.03-2.26
 * (the second rounds of the other runs waited 44-46% and read 614-621 Mbit/s).
 */
export function probeRound(round: number, measuredBytes: number, answer: ProbeArrival, maxMeasuredBytes: number, senderWaitShare = 0): ProbeRound {
  const timed = answer.bytes > 0 && answer.spanMs > 0;
  // untimed: it all came in one delivery, in less than the shortest span worth timing
  const read = timed ? (answer.bytes * 8 * 1000) / answer.spanMs : (measuredBytes * 8 * 1000) / PROBE_MIN_SPAN_MS;
  const bps = senderWaitShare >= STARVED_SENDER_SHARE ? read / (1 - Math.min(senderWaitShare, MAX_STARVED_SHARE)) : read;
  const wantedBytes = timed ? ((bps / 8) * 2 * PROBE_MIN_SPAN_MS) / 1000 : maxMeasuredBytes;
  const next = { bps, nextMeasuredBytes: Math.min(maxMeasuredBytes, Math.max(measuredBytes * 2, Math.ceil(wantedBytes))) };
  if (measuredBytes >= maxMeasuredBytes) return { bps };
  if (round === 1 && senderWaitShare > MAX_STARVED_SHARE) return next;
  if (timed && answer.spanMs >= PROBE_MIN_SPAN_MS) return { bps };
  if (timed && round >= 2 && (maxMeasuredBytes * 8 * 1000) / bps < PROBE_MIN_SPAN_MS) return { bps };
  return next;
}
