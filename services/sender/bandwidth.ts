/**
 * Bandwidth as the receiver sees it: bytes acknowledged over the time the link had them to carry,
 * over the newest ACKs (Elijah takes the median per blob, averaged over the last 6 blobs).
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
   * The figure is over the newest ACKs that hold `recentBusyMs` of link time: on a link busy all
   * the time that is the last 0.7 s, so a 5 -> 35 Mbit/s change reads 35 within 0.7 s (a window of
   * 2 s read 12.5 after half a second and 20 after one: the tuner acted on a 1.5 s phase of 35
   * when it was half over). On a link that waits for the pipeline, older ACKs up to `windowMs`.
   * `minBusyMs`: no figure with less link time than that. A shaper passes 64 KiB packets and the
   * receiver answers the frames in one read together, so two ACKs a few ms apart read as 30-60
   * Mbit/s on a 5 Mbit/s link (seen in load:adaptive: the tuner then left zstd-19).
   */
  constructor(
    private readonly windowMs = 3000,
    private readonly minBusyMs = 400,
    private readonly recentBusyMs = 700,
    /**
     * ... unless the newest ACKs holding this much link time read more than twice or less than
     * half that: then the link changed, and those are the figure. A 5 -> 35 Mbit/s change read
     * 33 Mbit/s 0.8 s after it (the link, waiting on a one-core pipeline, was busy half the time),
     * over half of a 1.5 s phase. A shaper's burst moves a quarter second's reading by well under 2x.
     */
    private readonly quickBusyMs = 250,
  ) {}

  /** An ACK of `bytes` sent at `sentMs` (first written). */
  ack(bytes: number, sentMs: number, atMs = performance.now()): void {
    const busyMs = Math.max(0, atMs - Math.max(sentMs, this.lastAckMs ?? sentMs));
    this.acks.push({ atMs, bytes, busyMs });
    this.totalAckedBytes += bytes;
    this.lastAckMs = atMs;
    while (this.acks.length > 1 && this.acks[0]!.atMs < atMs - this.windowMs) this.acks.shift();
  }

  /** bits per second of link time over the newest ACKs; undefined until they hold `minBusyMs` of it */
  get bandwidthBps(): number | undefined {
    let bytes = 0;
    let busyMs = 0;
    let quick: { bytes: number; busyMs: number } | undefined;
    for (let i = this.acks.length - 1; i >= 0 && busyMs < this.recentBusyMs; i--) {
      bytes += this.acks[i]!.bytes;
      busyMs += this.acks[i]!.busyMs;
      if (!quick && busyMs >= this.quickBusyMs) quick = { bytes, busyMs };
    }
    if (busyMs < Math.max(this.minBusyMs, 1e-3)) return undefined;
    const bps = (b: number, ms: number): number => (b * 8 * 1000) / ms;
    // the quick window against the ACKs before it (against the whole, which holds it, a change
    // showed for a few ACKs and hid again until the whole caught up)
    if (quick && busyMs - quick.busyMs > 0) {
      const newest = bps(quick.bytes, quick.busyMs);
      const before = bps(bytes - quick.bytes, busyMs - quick.busyMs);
      if (newest > before * 2 || newest < before / 2) return newest;
    }
    return bps(bytes, busyMs);
  }
}
