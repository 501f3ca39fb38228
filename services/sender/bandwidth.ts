/**
 * Bandwidth as the receiver sees it: bytes acknowledged over the time the link had them to carry,
 * over the newest ACKs.
 *
 * Each ACK is credited with the time since the later of the previous ACK and its frame's sending
 * (BBR's delivery rate, in short): time the link sat idle waiting for the pipeline is not counted,
 * so the figure is what the link carries while it has work, whether or not it is the bottleneck.
 * Plain ACK spacing would read the pipeline's pace whenever the pipeline is the slower one.
 */
export class BandwidthEstimator {
  private readonly acks: { atMs: number; bytes: number; busyMs: number }[] = [];
  totalAckedBytes = 0;
  lastAckMs: number | undefined;

  /**
   * The figure is over the newest ACKs that hold `recentBusyMs` of link time, short so that a
   * change of the link's speed shows before the tuner has sat through most of it; on a link that
   * waits for the pipeline, older ACKs up to `windowMs`. `minBusyMs`: no figure with less link
   * time than that, because a shaper passes large packets and the receiver answers the frames of
   * one read together: two ACKs a few ms apart read a slow link as many times its speed.
   */
  constructor(
    private readonly windowMs = 3000,
    private readonly minBusyMs = 400,
    private readonly recentBusyMs = 700,
    /**
     * ... unless the newest ACKs holding this much link time read more than twice or less than
     * half that: then the link changed, and those are the figure (a shaper's burst moves a reading
     * this long by well under 2x, so a burst alone does not pass for a change).
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
