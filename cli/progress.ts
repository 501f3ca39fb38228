/** A one-line progress bar with ETA on stderr (redrawn in place on a terminal, a line every few seconds otherwise). */
import { formatBytes, formatRate } from '../shared/config/units.js';

export interface ProgressState {
  fraction: number;
  phase: string;
  wireBytes: number;
  /**
   * The link's rate: bytes acknowledged over the time since its first chunk was sent (the sender's
   * average). Not the rate over the last ACKs, which reads a burst (a rate cap's, a shaper's) as the link.
   */
  linkRateBps: number;
}

/** The progress line (pure: the bar and the tests draw it alike). */
export function progressLine(label: string, p: ProgressState, elapsedSeconds: number): string {
  const f = Math.min(1, Math.max(0, p.fraction));
  const eta = f > 0.02 ? (elapsedSeconds * (1 - f)) / f : undefined;
  const width = 30;
  const filled = Math.round(f * width);
  const bar = `${'#'.repeat(filled)}${'.'.repeat(width - filled)}`;
  return (
    `${label} [${bar}] ${(f * 100).toFixed(0).padStart(3)}% ${p.phase.padEnd(10)} ` +
    `wire ${formatBytes(p.wireBytes)} @ ${formatRate(p.linkRateBps)}  ${elapsedSeconds.toFixed(1)} s, ETA ${eta === undefined ? '?' : `${eta.toFixed(1)} s`}`
  );
}

export class ProgressBar {
  private readonly startMs = performance.now();
  private lastLineMs = 0;
  private drawn = false;

  constructor(
    private readonly label: string,
    private readonly stream: NodeJS.WriteStream = process.stderr,
  ) {}

  update(p: ProgressState): void {
    const text = progressLine(this.label, p, (performance.now() - this.startMs) / 1000);
    if (this.stream.isTTY) {
      this.stream.write(`\r\x1b[2K${text}`);
      this.drawn = true;
    } else if (performance.now() - this.lastLineMs > 2000) {
      this.stream.write(`${text}\n`);
      this.lastLineMs = performance.now();
    }
  }

  done(): void {
    if (this.drawn) this.stream.write('\n');
    this.drawn = false;
  }
}
