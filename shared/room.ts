/**
 * Room in a work stream. A full stream refuses a publish (the pipeline's backpressure), and the
 * publisher tries again once the stream's consumer has acked. Trying again every 5-20 ms sent the
 * whole chunk each time: over a 36 s transfer at 5 Mbit/s in raw mode, dedup (whose chunks go to the
 * wire queue then) took 4.4 s of CPU and nats-server 3.5 s, nearly all of it refused publishes, on a
 * source whose link was the bottleneck. A consumer now announces each ack on core NATS, and a
 * waiting publisher tries again then; without an announcement (lost, or a consumer that does not
 * announce) it tries again after ROOM_WAIT_MAX_MS.
 */
import type { NatsConnection } from '@nats-io/transport-node';
import { roomSubject, type WorkStage } from './subjects.js';

/** the longest a publisher to a full stream waits without an announcement */
export const ROOM_WAIT_MAX_MS = 100;

/**
 * After an announcement the server may not yet have taken the acked message out of the stream
 * (the ack and the announcement are processed apart): a publish refused then tries once more
 * this soon, before it waits for the next announcement.
 */
export const ROOM_RECHECK_MS = 5;

/** A stage's announcements as one process sees them. */
export class RoomWatch {
  /** announcements seen so far: a publisher notes it before trying, to know whether one came meanwhile */
  announcements = 0;
  private readonly waiters = new Set<() => void>();

  constructor(nc: NatsConnection, stage: WorkStage) {
    nc.subscribe(roomSubject(stage), {
      callback: () => {
        this.announcements++;
        for (const wake of this.waiters) wake();
        this.waiters.clear();
      },
    });
  }

  /** Resolves true at the first announcement after the `seen`th, or false after `timeoutMs`. */
  next(seen: number, timeoutMs: number): Promise<boolean> {
    if (this.announcements !== seen) return Promise.resolve(true);
    return new Promise((resolve) => {
      const wake = (): void => {
        clearTimeout(timer);
        resolve(true);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(wake);
        resolve(false);
      }, timeoutMs);
      this.waiters.add(wake);
    });
  }
}

const watches = new WeakMap<NatsConnection, Map<WorkStage, RoomWatch>>();

/** The connection's watch on `stage`'s announcements, subscribed at its first use. */
export function roomWatch(nc: NatsConnection, stage: WorkStage): RoomWatch {
  let byStage = watches.get(nc);
  if (!byStage) watches.set(nc, (byStage = new Map()));
  let watch = byStage.get(stage);
  if (!watch) byStage.set(stage, (watch = new RoomWatch(nc, stage)));
  return watch;
}

/** A consumer of `stage`'s stream has acked: publishers waiting for room may try again. */
export function announceRoom(nc: NatsConnection, stage: WorkStage): void {
  if (!nc.isClosed()) nc.publish(roomSubject(stage));
}
