/** Token bucket for the demo rate cap (`--bandwidth`): paces writes to `rateBps` with a small burst. */
export class RateLimiter {
  private tokens: number;
  private last = performance.now();
  private readonly burstBytes: number;

  constructor(private readonly rateBps: number, burstBytes?: number) {
    this.burstBytes = burstBytes ?? Math.max(64 * 1024, rateBps / 8 / 20);
    this.tokens = this.burstBytes;
  }

  /** Resolves when `bytes` may be sent. */
  async take(bytes: number): Promise<void> {
    for (;;) {
      const now = performance.now();
      this.tokens = Math.min(this.burstBytes, this.tokens + ((now - this.last) / 1000) * (this.rateBps / 8));
      this.last = now;
      if (this.tokens >= Math.min(bytes, this.burstBytes)) {
        this.tokens -= bytes;
        return;
      }
      const waitMs = ((Math.min(bytes, this.burstBytes) - this.tokens) / (this.rateBps / 8)) * 1000;
      await new Promise((r) => setTimeout(r, Math.max(1, waitMs)));
    }
  }
}
