/**
 * Bandwidth as the receiver sees it: bytes acknowledged over the time the link had them to carry,
 * over a sliding window of recent ACKs (Elijah takes the median per blob; a window over ACK times
 * reacts within a second).
 *
 * Each ACK is credited with the time since the later of the previous ACK and its frame's sending
 * (BBR's delivery rate, in short): time the link sat idle waiting for the pipeline is not counted,
 * so the figure is what the link carries while it has work, whether or not it is the bottleneck.
 * Bytes over plain ACK spacing read the pipeline's pace when the pipeline is slower (it then looked
 * like half the link, and the tuner doubled it by guess).
 */
export class BandwidthEstimator {
  private readonly acks: { atMs: number; bytes: number; busyMs: number }[] = [];
  totalAckedBytes = 0;
  lastAckMs: number | undefined;

  /**
   * `minBusyMs`: no figure until the window holds this much link time. A shaper passes 64 KiB
   * packets and the receiver answers the frames in one read together, so two ACKs a few ms apart
   * read as 30-60 Mbit/s on a 5 Mbit/s link (seen in load:adaptive: the tuner then left zstd-19).
   */
  constructor(
    private readonly windowMs = 2000,
    private readonly minBusyMs = 400,
  ) {}

  /** An ACK of `bytes` sent at `sentMs` (first written). */
  ack(bytes: number, sentMs: number, atMs = performance.now()): void {
    const busyMs = Math.max(0, atMs - Math.max(sentMs, this.lastAckMs ?? sentMs));
    this.acks.push({ atMs, bytes, busyMs });
    this.totalAckedBytes += bytes;
    this.lastAckMs = atMs;
    while (this.acks.length > 1 && this.acks[0]!.atMs < atMs - this.windowMs) this.acks.shift();
  }

  /** bits per second of link time over the window; undefined until it holds `minBusyMs` of it */
  get bandwidthBps(): number | undefined {
    let bytes = 0;
    let busyMs = 0;
    for (const a of this.acks) {
      bytes += a.bytes;
      busyMs += a.busyMs;
    }
    if (busyMs < Math.max(this.minBusyMs, 1e-3)) return undefined;
    return (bytes * 8 * 1000) / busyMs;
  }
}
