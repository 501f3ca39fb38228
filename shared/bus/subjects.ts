/** Subjects, streams, consumers and buckets: named once, here. */

/** Work-queue streams, one per stage input, so each stage has its own backpressure. */
export const STREAMS = {
  dedup: 'HANDOFF_DEDUP',
  delta: 'HANDOFF_DELTA',
  compress: 'HANDOFF_COMPRESS',
  wire: 'HANDOFF_WIRE',
  /** limits stream of control events, so a late subscriber still sees a migration's history */
  events: 'HANDOFF_EVENTS',
  /** limits stream of messages given up on (malformed, or failing every attempt), each with its reason */
  dead: 'HANDOFF_DEAD',
} as const;

export const WORK_STAGES = ['dedup', 'delta', 'compress', 'wire'] as const;
export type WorkStage = (typeof WORK_STAGES)[number];

/** `handoff.<stage>.<partition>.<migrationId>`; only dedup has more than partition 0. */
export function workSubject(stage: WorkStage, migrationId: string, partition = 0): string {
  return `handoff.${stage}.${partition}.${migrationId}`;
}

/** the stage whose stream takes a subject of workSubject's; undefined for any other subject (events, dead letters) */
export function workStageOf(subject: string): WorkStage | undefined {
  const stage = subject.split('.')[1];
  return stage === 'dedup' || stage === 'delta' || stage === 'compress' || stage === 'wire' ? stage : undefined;
}

/** `handoff.room.<stage>`: the stage's consumer has acked a message (core NATS, see shared/bus/room.ts) */
export function roomSubject(stage: WorkStage): string {
  return `handoff.room.${stage}`;
}

export function workFilter(stage: WorkStage, partition?: number): string {
  return partition === undefined ? `handoff.${stage}.>` : `handoff.${stage}.${partition}.*`;
}

/** one migration's messages in a stage's stream, every partition */
export function migrationWorkFilter(stage: WorkStage, migrationId: string): string {
  return `handoff.${stage}.*.${migrationId}`;
}

/** the sender's durable consumer of one migration's wire messages (migration ids are [A-Za-z0-9_-]) */
export function migrationWireDurable(migrationId: string): string {
  return `wire-${migrationId}`;
}

/** Durable consumer shared by every instance of a stage (and partition). */
export function durableName(stage: WorkStage, partition?: number): string {
  return partition === undefined ? `${stage}` : `${stage}-${partition}`;
}

export function eventSubject(migrationId: string, type: string): string {
  return `handoff.events.${migrationId}.${type}`;
}
export const EVENTS_FILTER = 'handoff.events.>';

/** `handoff.dead.<stage>.<migrationId>`: where a stage puts a message it gives up on */
export function deadLetterSubject(stage: string, migrationId: string): string {
  return `handoff.dead.${stage}.${migrationId}`;
}
export const DEAD_FILTER = 'handoff.dead.>';

/** headers of a dead letter: why, from where, after how many deliveries */
export const DEAD_HEADERS = { reason: 'Handoff-Reason', subject: 'Handoff-Subject', deliveries: 'Handoff-Deliveries' } as const;

/** per-chunk statistics; core NATS (lossy is fine: they feed summaries and the tuner) */
export function statsSubject(migrationId: string, stage: string): string {
  return `handoff.stats.${migrationId}.${stage}`;
}
export const STATS_FILTER = 'handoff.stats.>';

/** `handoff.link.<migrationId>`: the sender's link reports (core NATS: the next one supersedes a lost one) */
export function linkSubject(migrationId: string): string {
  return `handoff.link.${migrationId}`;
}
export const LINK_FILTER = 'handoff.link.>';

/** the migration a work subject (workSubject's) belongs to */
export function migrationOfWorkSubject(subject: string): string | undefined {
  return subject.split('.')[3];
}

export const BUCKETS = {
  /** migrationId -> MigrationDescriptor */
  migrations: 'handoff_migrations',
  /** migrationId -> Mode currently wanted (the tuner writes it; stages apply it from their next chunk) */
  config: 'handoff_config',
  /** `STAGE.INSTANCE` -> heartbeat of a running worker; `want.STAGE` -> workers the tuner wants in use */
  workers: 'handoff_workers',
} as const;
