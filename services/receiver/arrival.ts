/**
 * Receiver-side timing of probe frames, by delivery. A shaper releases a queued packet only when
 * its tokens allow, so the time between two deliveries is the later one's transmission at the
 * link's rate. Answers timed at the sender (or ACK spacing) lump a packet holding the end of one
 * frame and most of the next into one instant, and read a slow link at twice its rate or more; so
 * this counts only the bytes that arrived after the delivery that finished the previous probe, over
 * the time between the two deliveries (over TLS, up to a record of the lead's last packet is
 * handed over only with the next one).
 */
import type { ProbeArrival } from '../../shared/wire/frames.js';

export class ArrivalTimer {
  private deliveryId = 0;
  private deliveryStartMs = 0;
  private receivedBytes = 0;
  /** the delivery that finished the previous probe, and the bytes received by its end */
  private mark: { deliveryId: number; startMs: number; bytesAtEnd: number } | undefined;

  /**
   * Every read from the socket, before its frames are parsed. `sameTurn`: in the event loop's turn
   * of the read before, the same delivery (TLS hands a packet over record by record in one turn; a
   * rule by time either split a delivery where parsing took a while, or merged a fast flow into one).
   */
  read(bytes: number, atMs = performance.now(), sameTurn = false): void {
    if (!sameTurn) {
      this.deliveryId++;
      this.deliveryStartMs = atMs;
    }
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
