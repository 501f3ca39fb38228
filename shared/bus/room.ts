/**
 * Room in a work stream. A full stream refuses a publish (the pipeline's backpressure), and the
 * publisher tries again once the stream's consumer has acked: trying again on a short timer sends
 * the whole chunk each time, and on a slow link most of the source's CPU went into refused
 * publishes. A consumer announces each ack on core NATS, and a waiting publisher tries again then; without an announcement (lost, or a consumer that does not
 * announce) it tries again after ROOM_WAIT_MAX_MS.
 */
import type { NatsConnection } from '@nats-io/transport-node';
import { roomSubject, type WorkStage } from './subjects.js';

/** the longest a publisher to a full stream waits without an announcement */
export const ROOM_WAIT_MAX_MS = 100;

/**
 * After an announcement the server may not yet have taken the acked message out of the stream
 * (it processes the ack and the publish apart, and later on a busy core): a publish refused then
 * tries again this soon, and again at twice the wait up to ROOM_RECHECK_MAX_MS, before it waits
 * for the next announcement: a single recheck left a fast link idle behind a busy server.
 */
export const ROOM_RECHECK_MS = 5;
export const ROOM_RECHECK_MAX_MS = 20;

/** How long a publisher refused by a full stream waits next, given how its last wait ended. */
export function nextRoomWaitMs(lastWaitMs: number, announced: boolean): number {
  if (announced) return ROOM_RECHECK_MS;
  return lastWaitMs < ROOM_RECHECK_MAX_MS ? lastWaitMs * 2 : ROOM_WAIT_MAX_MS;
}

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
