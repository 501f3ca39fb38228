/** Sizes that several parts must agree on, each derived from the one it must fit in. */

/**
 * The largest NATS message (max_payload): the embedded server's and infra/nats/*.conf's
 * (test/unit/limits.test.ts holds them to it). Chunks are sized to fit it, and a captured event
 * carries the whole device state in one message.
 */
export const NATS_MAX_PAYLOAD_BYTES = 8 * 1024 * 1024;

/** What a captured event holds besides its device state: hashes, counts, the rounds' records. */
export const CAPTURED_EVENT_OVERHEAD_BYTES = 64 * 1024;

/** The largest device state a captured event carries: base64 characters of its patch against the base's. */
export const MAX_DEVICE_STATE_CHARS = NATS_MAX_PAYLOAD_BYTES - CAPTURED_EVENT_OVERHEAD_BYTES;

/**
 * Messages one migration may have in the work streams at once (capture waits above it): each
 * migration's chunks wait for its own link at the source, not in a stream all migrations share,
 * so a slow link's chunks cannot fill a stream another migration's chunks must pass through.
 * The sender sizes the wire stream to hold this much of every migration it serves.
 */
export function migrationBacklogMaxMessages(): number {
  return Number(process.env.HANDOFF_MIGRATION_BACKLOG ?? 32);
}
