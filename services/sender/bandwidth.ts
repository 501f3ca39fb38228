/**
 * Bandwidth as the receiver sees it: bytes acknowledged over a sliding window of recent ACKs
 * (Elijah takes the median per blob; a window over ACK times reacts within a second).
 */
export class BandwidthEstimator {
  private readonly acks: { atMs: number; bytes: number }[] = [];
  totalAckedBytes = 0;
  lastAckMs: number | undefined;

  constructor(private readonly windowMs = 2000) {}

  ack(bytes: number, atMs = performance.now()): void {
    this.acks.push({ atMs, bytes });
    this.totalAckedBytes += bytes;
    this.lastAckMs = atMs;
    while (this.acks.length > 2 && this.acks[0]!.atMs < atMs - this.windowMs) this.acks.shift();
  }

  /** bits per second over the window; undefined until two ACKs span some time */
  get bandwidthBps(): number | undefined {
    if (this.acks.length < 2) return undefined;
    const first = this.acks[0]!;
    const last = this.acks[this.acks.length - 1]!;
    const spanMs = last.atMs - first.atMs;
    if (spanMs <= 0) return undefined;
    let bytes = 0;
    for (let i = 1; i < this.acks.length; i++) bytes += this.acks[i]!.bytes;
    return (bytes * 8 * 1000) / spanMs;
  }
}
