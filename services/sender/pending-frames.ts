/**
 * The link's chunk frames not yet acknowledged: each is settled by the receiver's ACK (or its
 * report, after a reconnection, that it applied the frame before the drop), and those written to a
 * lost connection are what a resume sends again.
 */

export interface SentChunk {
  /** size of one copy of the frame */
  frameBytes: number;
  /** copies written (more than 1 after a drop or a corrupted frame) */
  sends: number;
}

/** `C`: a connection, compared by identity only */
export interface PendingFrame<C> {
  frameNo: number;
  pieces: [Buffer, Uint8Array];
  bytes: number;
  /** times written to a connection */
  sends: number;
  /** the connection it was last written to (a resume sends again what went to an older one) */
  sentOn: C | undefined;
  /** when first written */
  sentMs: number | undefined;
}

interface Entry<C> {
  frame: PendingFrame<C>;
  resolve: (sent: SentChunk) => void;
  reject: (err: Error) => void;
}

export class PendingFrames<C> {
  private readonly entries = new Map<number, Entry<C>>();

  get size(): number {
    return this.entries.size;
  }

  has(frameNo: number): boolean {
    return this.entries.has(frameNo);
  }

  /** A frame not yet written; `acked` settles when the receiver has applied it or the link fails. */
  add(frameNo: number, pieces: [Buffer, Uint8Array]): { frame: PendingFrame<C>; acked: Promise<SentChunk> } {
    const frame: PendingFrame<C> = { frameNo, pieces, bytes: pieces[0].byteLength + pieces[1].byteLength, sends: 0, sentOn: undefined, sentMs: undefined };
    const acked = new Promise<SentChunk>((resolve, reject) => this.entries.set(frameNo, { frame, resolve, reject }));
    return { frame, acked };
  }

  /** `frame` is about to be written to `conn` */
  markSent(frame: PendingFrame<C>, conn: C): void {
    frame.sentOn = conn;
    frame.sends++;
    frame.sentMs ??= performance.now();
  }

  /** The receiver has applied frame `frameNo`: settled and returned (undefined for a copy acknowledged already). */
  acknowledge(frameNo: number): PendingFrame<C> | undefined {
    const entry = this.entries.get(frameNo);
    if (!entry) return undefined;
    this.entries.delete(frameNo);
    entry.resolve({ frameBytes: entry.frame.bytes, sends: entry.frame.sends });
    return entry.frame;
  }

  /** frames last written to a connection other than `conn` (a lost one): to send again on `conn` */
  sentBefore(conn: C): PendingFrame<C>[] {
    return [...this.entries.values()].map((e) => e.frame).filter((f) => f.sentOn !== undefined && f.sentOn !== conn);
  }

  /** the link has failed: every frame with it */
  rejectAll(err: Error): void {
    for (const entry of this.entries.values()) entry.reject(err);
    this.entries.clear();
  }
}
