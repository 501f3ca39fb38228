/**
 * The link probe's rounds (WanLink.probe sends them): what a round's answer reads, and whether a
 * larger measured frame, one more round, could read more.
 */
import type { ProbeArrival } from '../../shared/wire/frames.js';

/** the receiver's timing of a probe frame is trusted from this span (below, a larger frame follows) */
export const PROBE_MIN_SPAN_MS = 10;

/**
 * A sender that waited for a core this share of a round or more (runnable, not running: the
 * actors start their work at the accept, on the same cores) set the frame's pace, not the link.
 * Such a reading is scaled by the share of the round the sender ran, as if the link had idled
 * while it waited, at most twice (MAX_STARVED_SHARE): data already queued kept the link busy
 * meanwhile. A first round the sender waited through for more than MAX_STARVED_SHARE reads too
 * little of the link to scale: one more round follows (see probeRound).
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
 * that largest frame would cross within the span ends it too: no round could time it, and more
 * rounds only delay capture, which waits for the tuner's first look. The first round's frame
 * follows a lead sized for a shaper's burst, not for the reading: its reading alone decides
 * nothing of the kind. `senderWaitShare`: the share of the round the sender waited for a core (see
 * STARVED_SENDER_SHARE). A first round it waited through for more than MAX_STARVED_SHARE is
 * followed by another, whatever its span: scaled, it can still read a fast link as a slow one.
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
