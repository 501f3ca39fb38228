/**
 * Receiver-side timing of probe frames, by delivery. A shaper releases a queued packet only when
 * its tokens allow, so the time between two deliveries is the later one's transmission at the
 * link's rate. Answers timed at the sender (or ACK spacing) lump a 64 KiB packet holding the end of
 * one frame and most of the next into one instant: a 64 KiB probe behind a 128 KiB lead read
 * 12-14 Mbit/s on a 5 Mbit/s tbf link. Counting only the bytes that arrived after the delivery
 * that finished the previous probe, over the time between the two deliveries, read 4.8-6.4.
 */
import type { ProbeArrival } from '../../shared/wire.js';

/**
 * Reads closer together than this are one delivery. A 64 KiB packet takes 0.5 ms at 1000 Mbit/s:
 * a faster flow reads as one delivery, too fast to time, which the sender takes as fast.
 */
const SAME_DELIVERY_MS = 1;

export class ArrivalTimer {
  private deliveryId = 0;
  private deliveryStartMs = 0;
  private lastReadMs = -Infinity;
  private receivedBytes = 0;
  /** the delivery that finished the previous probe, and the bytes received by its end */
  private mark: { deliveryId: number; startMs: number; bytesAtEnd: number } | undefined;

  /**
   * Every read from the socket, before its frames are parsed. `sameTurn`: in the event loop's turn
   * of the read before (TLS hands a packet over record by record, in one turn, and the time a
   * record's frames take to parse must not split it: with 0.25 ms for a delivery, a 5 Mbit/s link
   * probed at 13).
   */
  read(bytes: number, atMs = performance.now(), sameTurn = false): void {
    if (!sameTurn && atMs - this.lastReadMs > SAME_DELIVERY_MS) {
      this.deliveryId++;
      this.deliveryStartMs = atMs;
    }
    this.lastReadMs = atMs;
    this.receivedBytes += bytes;
    if (this.mark?.deliveryId === this.deliveryId) this.mark.bytesAtEnd = this.receivedBytes;
  }

  /** A probe frame finished in the latest read: its timing against the previous probe. */
  probeFinished(): ProbeArrival {
    const m = this.mark;
    const arrival = m && m.deliveryId < this.deliveryId ? { bytes: this.receivedBytes - m.bytesAtEnd, spanMs: this.deliveryStartMs - m.startMs } : { bytes: 0, spanMs: 0 };
    this.mark = { deliveryId: this.deliveryId, startMs: this.deliveryStartMs, bytesAtEnd: this.receivedBytes };
    return arrival;
  }
}
