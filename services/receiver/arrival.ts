/**
 * Receiver-side timing of probe frames, by delivery. A shaper releases a queued packet only when
 * its tokens allow, so the time between two deliveries is the later one's transmission at the
 * link's rate. Answers timed at the sender (or ACK spacing) lump a 64 KiB packet holding the end of
 * one frame and most of the next into one instant: a 64 KiB probe behind a 128 KiB lead read
 * 12-14 Mbit/s on a 5 Mbit/s tbf link. Counting only the bytes that arrived after the delivery
 * that finished the previous probe, over the time between the two deliveries, read 4.6-6.7 over
 * TLS (up to a record, 16 KiB, of the lead's last packet is handed over only with the next one).
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
   * rule by time split them where parsing a record's frames took a while, and a 5 Mbit/s link
   * probed at 13 with 0.25 ms, while 1 ms merged a 1000 Mbit/s flow into one untimed delivery).
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
