/**
 * The bus: one NATS connection with JetStream, the streams and buckets every actor expects
 * (created idempotently by whoever connects first), and publishing with backpressure.
 */
import {
  AckPolicy,
  DeliverPolicy,
  DiscardPolicy,
  JetStreamApiError,
  jetstream,
  jetstreamManager,
  RetentionPolicy,
  StorageType,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
} from '@nats-io/jetstream';
import { Kvm, type KV } from '@nats-io/kv';
import { TimeoutError, connect, headers, nanos, type MsgHdrs, type NatsConnection, type Subscription } from '@nats-io/transport-node';
import { BUCKETS, DEAD_FILTER, DEAD_HEADERS, EVENTS_FILTER, STREAMS, WORK_STAGES, deadLetterSubject, linkSubject, migrationOfWorkSubject, migrationWireDurable, migrationWorkFilter, statsSubject, durableName, eventSubject, workFilter, workStageOf, type WorkStage } from './subjects.js';
import { ROOM_WAIT_MAX_MS, nextRoomWaitMs, roomWatch } from './room.js';
import { encodeEvent, parseEvent, type MigrationEvent, type StageStats } from '../model/migration.js';
import { recordLinkReport, recordStats } from '../telemetry/telemetry.js';
import { encodeLinkReport, type LinkReport } from '../model/link-report.js';
import { natsAuthFor, natsConnectOptions, redactNatsUrl } from './nats-auth.js';
import { EndedMigrationError } from './registry.js';
import { NATS_MAX_PAYLOAD_BYTES } from '../config/limits.js';

export interface Bus {
  nc: NatsConnection;
  js: JetStreamClient;
  jsm: JetStreamManager;
  migrations: KV;
  config: KV;
  /** the server's max_payload: chunks must fit it, headers included */
  maxPayloadBytes: number;
  /** connected now (false while reconnecting) */
  connected(): boolean;
  close(): Promise<void>;
}

/** Work-queue stream size: a full stream refuses publishes, which is the pipeline's backpressure. */
export const WIRE_QUEUE_MIN_BYTES = 2 * 1024 * 1024;
export const WIRE_QUEUE_MAX_BYTES = 64 * 1024 * 1024;

/**
 * Resizes the wire queue (the sender sizes it to about a second of the measured bandwidth: long
 * enough to keep a fast link busy, short enough that chunks for a slow one wait unencoded).
 */
export async function resizeWireQueue(bus: Bus, maxBytes: number): Promise<void> {
  await bus.jsm.streams.update(STREAMS.wire, { max_bytes: Math.round(maxBytes) });
}

function workStreamMaxBytes(stage: WorkStage): number {
  // The wire queue is kept short: chunks waiting for a slow WAN should wait unprocessed, upstream,
  // so that a mode the tuner chooses now applies to them (a long wire queue is encoded already).
  if (stage === 'wire') return Number(process.env.HANDOFF_WIRE_STREAM_MAX_BYTES ?? WIRE_QUEUE_MIN_BYTES);
  return Number(process.env.HANDOFF_STREAM_MAX_BYTES ?? 256 * 1024 * 1024);
}
const STORAGE = process.env.HANDOFF_STORAGE === 'memory' ? StorageType.Memory : StorageType.File;

export async function connectBus(url: string, name: string): Promise<Bus> {
  const { servers, auth } = natsAuthFor(url);
  const nc = await connect({ servers, name, maxReconnectAttempts: -1, reconnectTimeWait: 250, ...natsConnectOptions(auth) }).catch((err: unknown) => {
    const text = err instanceof Error ? err.message : String(err);
    const hint = /authori[sz]ation|auth/i.test(text) ? ' (credentials: user:password in the URL, HANDOFF_NATS_USER/HANDOFF_NATS_PASSWORD, or HANDOFF_NATS_NKEY_SEED)' : '';
    throw new Error(`cannot connect to NATS at ${redactNatsUrl(url)}: ${text}${hint}`);
  });
  // a JetStream domain: an actor on another host of the cloudlet reaches the cloudlet's streams
  // through its leaf-node server by the hub's domain (see infra/nats/)
  const domain = process.env.HANDOFF_JS_DOMAIN;
  const jsOptions = domain ? { domain } : {};
  const jsm = await jetstreamManager(nc, jsOptions);
  const js = jetstream(nc, jsOptions);
  await ensureStreams(jsm);
  for (const [actor, type] of EVENT_CONSUMERS) await ensureEventConsumer(jsm, actor, type);
  let connected = true;
  void (async () => {
    for await (const s of nc.status()) {
      if (s.type === 'disconnect' || s.type === 'close') connected = false;
      else if (s.type === 'reconnect') connected = true;
    }
  })().catch(() => undefined);
  const kvm = new Kvm(js);
  const migrations = await kvm.create(BUCKETS.migrations, { history: 1, storage: STORAGE });
  const config = await kvm.create(BUCKETS.config, { history: 5, storage: STORAGE });
  return {
    nc,
    js,
    jsm,
    migrations,
    config,
    maxPayloadBytes: nc.info?.max_payload ?? 1024 * 1024,
    connected: () => connected && !nc.isClosed(),
    close: async () => {
      if (!nc.isClosed()) await nc.drain().catch(() => nc.close());
    },
  };
}

async function ensureStream(jsm: JetStreamManager, name: string, config: Parameters<JetStreamManager['streams']['add']>[0]): Promise<void> {
  try {
    await jsm.streams.info(name);
  } catch {
    try {
      await jsm.streams.add({ ...config, name });
    } catch (err) {
      // another actor created it in between
      await jsm.streams.info(name).catch(() => {
        throw err;
      });
    }
  }
}

async function ensureStreams(jsm: JetStreamManager): Promise<void> {
  const work: [string, WorkStage][] = [
    [STREAMS.dedup, 'dedup'],
    [STREAMS.delta, 'delta'],
    [STREAMS.compress, 'compress'],
    [STREAMS.wire, 'wire'],
  ];
  for (const [name, stage] of work) {
    await ensureStream(jsm, name, {
      name,
      subjects: [workFilter(stage)],
      retention: RetentionPolicy.Workqueue,
      storage: STORAGE,
      max_bytes: workStreamMaxBytes(stage),
      discard: DiscardPolicy.New,
      duplicate_window: nanos(120_000),
    });
  }
  await ensureStream(jsm, STREAMS.events, {
    name: STREAMS.events,
    subjects: [EVENTS_FILTER],
    retention: RetentionPolicy.Limits,
    storage: STORAGE,
    max_age: nanos(24 * 3600_000),
    max_bytes: 64 * 1024 * 1024,
  });
  await ensureStream(jsm, STREAMS.dead, {
    name: STREAMS.dead,
    subjects: [DEAD_FILTER],
    retention: RetentionPolicy.Limits,
    storage: STORAGE,
    max_age: nanos(7 * 24 * 3600_000),
    max_bytes: 256 * 1024 * 1024,
    discard: DiscardPolicy.Old,
  });
}

/** Keeps a message a stage gives up on, with the reason, for an operator to inspect (`nats stream view HANDOFF_DEAD`). */
export async function publishDeadLetter(bus: Bus, stage: string, migrationId: string, m: JsMsg, reason: string): Promise<void> {
  const h = headers();
  h.set(DEAD_HEADERS.reason, reason.replace(/[\r\n]+/g, ' ').slice(0, 1024));
  h.set(DEAD_HEADERS.subject, m.subject);
  h.set(DEAD_HEADERS.deliveries, String(m.info.deliveryCount));
  const data = m.data.byteLength + 4096 <= bus.maxPayloadBytes ? m.data : m.data.subarray(0, bus.maxPayloadBytes - 4096);
  await bus.js.publish(deadLetterSubject(stage, migrationId), data, { headers: h });
}

/**
 * Messages of one migration still in the work streams: not yet acknowledged by the stage that
 * takes them (a stage publishes its output before it acknowledges its input, so a chunk between
 * stages is counted once at least). Zero: everything published for it has reached the destination.
 * Other migrations' messages are not counted: each migration's rounds wait on its own chunks.
 */
export async function migrationBacklog(bus: Bus, migrationId: string): Promise<number> {
  const counts = await Promise.all(
    WORK_STAGES.map(async (stage) => {
      const info = await bus.jsm.streams.info(STREAMS[stage], { subjects_filter: migrationWorkFilter(stage, migrationId) });
      return Object.values(info.state.subjects ?? {}).reduce((a, n) => a + n, 0);
    }),
  );
  return counts.reduce((a, n) => a + n, 0);
}

/** whether the migration's descriptor is still in the bucket (a read that fails counts as gone) */
async function migrationExists(bus: Bus, migrationId: string): Promise<boolean> {
  return ((await bus.migrations.get(migrationId).catch(() => null))?.length ?? 0) > 0;
}

/**
 * Waits until `migrationId` has fewer than `below` messages in the work streams; fails with
 * EndedMigrationError once its descriptor is gone (the migration ended meanwhile).
 */
export async function waitMigrationBacklog(bus: Bus, migrationId: string, below: number, pollMs = 20): Promise<void> {
  for (let i = 0; ; i++) {
    if ((await migrationBacklog(bus, migrationId)) < below) return;
    if (i % 10 === 9 && !(await migrationExists(bus, migrationId))) throw new EndedMigrationError(`the migration ${migrationId} ended while its chunks were on their way`);
    await new Promise((r) => setTimeout(r, pollMs));
  }
}

/**
 * Purges the wire messages of migrations that have ended (descriptor gone): a stage that held one
 * of their chunks while they ended publishes it after their purge, and with no consumer left it
 * would hold the wire queue's room for good. Returns the migrations purged.
 */
export async function purgeEndedWireWork(bus: Bus): Promise<string[]> {
  const info = await bus.jsm.streams.info(STREAMS.wire, { subjects_filter: workFilter('wire') });
  const migrationIds = new Set(Object.keys(info.state.subjects ?? {}).flatMap((subject) => migrationOfWorkSubject(subject) ?? []));
  const purged: string[] = [];
  for (const migrationId of migrationIds) {
    if (await migrationExists(bus, migrationId)) continue;
    await purgeMigrationWire(bus, migrationId);
    purged.push(migrationId);
  }
  return purged;
}

export function streamOf(stage: WorkStage): string {
  return STREAMS[stage];
}

/**
 * Deliveries of a work message after which the stage failing on it gives up: a dead letter with the
 * reason, and its migration failed.
 */
export const MAX_DELIVERIES = 5;
/**
 * The server's limit is a multiple of it: deliveries whose ack wait ran out (a worker died or
 * stalled) count too, and at max_deliver the server drops a message without a word.
 */
const SERVER_MAX_DELIVER = 4 * MAX_DELIVERIES;

/**
 * The durable consumer of one migration's wire messages: the sender reads each migration's chunks
 * at its own link's pace, so a slow link holds back no other migration's chunks.
 */
export async function ensureMigrationWireConsumer(bus: Bus, migrationId: string, ackWaitMs: number): Promise<string> {
  const durable = migrationWireDurable(migrationId);
  await bus.jsm.consumers.add(STREAMS.wire, {
    durable_name: durable,
    ack_policy: AckPolicy.Explicit,
    filter_subject: migrationWorkFilter('wire', migrationId),
    ack_wait: nanos(ackWaitMs),
    max_deliver: SERVER_MAX_DELIVER,
  });
  return durable;
}

/**
 * A migration that has ended: its wire consumer deleted and its wire messages purged. The other
 * stages' streams are not purged: their consumers are shared, and nats-server before 2.9.12 moves a
 * consumer whose filter covers a filtered purge past other migrations' messages (nats-server #3838);
 * the stages drop an ended migration's chunks as they come (EndedMigrationError).
 */
export async function dropMigrationWork(bus: Bus, migrationId: string): Promise<void> {
  await bus.jsm.consumers.delete(STREAMS.wire, migrationWireDurable(migrationId)).catch(() => undefined);
  await purgeMigrationWire(bus, migrationId).catch(() => undefined);
}

/** one migration's wire messages purged: only its own consumer reads them (see dropMigrationWork) */
async function purgeMigrationWire(bus: Bus, migrationId: string): Promise<void> {
  await bus.jsm.streams.purge(STREAMS.wire, { filter: migrationWorkFilter('wire', migrationId) });
}

/** Creates (or keeps) the durable pull consumer a stage's instances share. */
export async function ensureWorkConsumer(bus: Bus, stage: WorkStage, partition: number | undefined, ackWaitMs: number): Promise<string> {
  const durable = durableName(stage, partition);
  await bus.jsm.consumers.add(streamOf(stage), {
    durable_name: durable,
    ack_policy: AckPolicy.Explicit,
    filter_subject: workFilter(stage, partition),
    ack_wait: nanos(ackWaitMs),
    max_deliver: SERVER_MAX_DELIVER,
    max_ack_pending: 64,
    deliver_policy: DeliverPolicy.All,
  });
  return durable;
}

/**
 * The events actors act on, each through a durable consumer so that every event is handled by one
 * instance. Created by whoever connects first, so an event published before its actor started waits.
 */
const EVENT_CONSUMERS: [string, MigrationEvent['type']][] = [
  ['sender', 'start'],
  ['sender', 'captured'],
  ['capture', 'accepted'],
];

export async function ensureEventConsumer(jsm: JetStreamManager, actor: string, type: MigrationEvent['type']): Promise<string> {
  const durable = `${actor}-on-${type}`;
  await jsm.consumers.add(STREAMS.events, {
    durable_name: durable,
    ack_policy: AckPolicy.Explicit,
    filter_subject: eventSubject('*', type),
    ack_wait: nanos(60_000),
    deliver_policy: DeliverPolicy.New,
  });
  return durable;
}

/**
 * JetStream API error codes (nats-server's errors.json) a refused publish is told apart by: the
 * client gives them as JetStreamApiError.code.
 */
const JS_ERR = {
  accountResourcesExceeded: 10002,
  clusterNotAvailable: 10008,
  clusterNotLeader: 10009,
  insufficientResources: 10023,
  memoryResourcesExceeded: 10028,
  notEnabledForAccount: 10039,
  storageResourcesExceeded: 10047,
  streamNotFound: 10059,
  notEnabled: 10076,
  /** "{the store's error}": a stream limit among others */
  streamStoreFailed: 10077,
} as const;

const OUT_OF_ROOM = new Set<number>([JS_ERR.accountResourcesExceeded, JS_ERR.insufficientResources, JS_ERR.memoryResourcesExceeded, JS_ERR.storageResourcesExceeded]);
const JETSTREAM_AWAY = new Set<number>([JS_ERR.clusterNotAvailable, JS_ERR.clusterNotLeader, JS_ERR.notEnabledForAccount, JS_ERR.streamNotFound, JS_ERR.notEnabled]);

/** The stream (or the server's store) has no room now: an ack will make some. */
export function isStreamFull(err: unknown): boolean {
  if (!(err instanceof JetStreamApiError)) return false;
  if (OUT_OF_ROOM.has(err.code)) return true;
  // a failed store names its error only in the text: the stream's limits, or a full disk
  return err.code === JS_ERR.streamStoreFailed && /^maximum (bytes|messages)|no space/i.test(err.message);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The server is away for a moment (restarting, reconnecting, electing a leader): worth trying again. */
export function isTransient(err: unknown): boolean {
  // no answer in time: the client holds requests while it reconnects
  if (err instanceof TimeoutError) return true;
  // no one answers for the stream (JetStream starting, a leaf node's hub away); not exported by name
  if (err instanceof Error && err.name === 'JetStreamNotEnabled') return true;
  return err instanceof JetStreamApiError && JETSTREAM_AWAY.has(err.code);
}

/** How long a publish keeps trying while the server is away before the error is reported. */
const OUTAGE_BUDGET_MS = Number(process.env.HANDOFF_BUS_OUTAGE_MS ?? 60_000);

/**
 * Publishes to a work stream, waiting while the stream is full (backpressure) and, for a while,
 * while the server is away. `msgId` makes a retried publish a no-op for JetStream's duplicate window.
 */
export async function publishWork(bus: Bus, subject: string, data: Uint8Array, msgId?: string, headers?: MsgHdrs, onWait?: () => void): Promise<void> {
  const stage = workStageOf(subject);
  // a full work stream is waited on until its consumer announces an ack (see shared/bus/room.ts)
  const room = stage ? roomWatch(bus.nc, stage) : undefined;
  let waitMs = ROOM_WAIT_MAX_MS;
  let outageSince: number | undefined;
  for (;;) {
    const seen = room?.announcements ?? 0;
    try {
      await bus.js.publish(subject, data, { ...(msgId ? { msgID: msgId } : {}), ...(headers ? { headers } : {}), timeout: 10_000 });
      return;
    } catch (err) {
      onWait?.();
      if (isStreamFull(err)) {
        outageSince = undefined;
        if (room) waitMs = nextRoomWaitMs(waitMs, await room.next(seen, waitMs));
        else await sleep(ROOM_WAIT_MAX_MS);
      } else if (isTransient(err) && (outageSince ??= performance.now()) > performance.now() - OUTAGE_BUDGET_MS) {
        await sleep(250);
      } else {
        throw outageSince === undefined ? err : new Error(`NATS unavailable for ${Math.round(OUTAGE_BUDGET_MS / 1000)} s: ${(err as Error).message}`);
      }
    }
  }
}

/** A chunk's statistics: to this process's metrics, and on the bus for summaries and the tuner (core NATS: lossy is fine). */
export function publishStats(bus: Bus, stats: StageStats): void {
  recordStats(stats);
  bus.nc.publish(statsSubject(stats.migrationId, stats.stage), JSON.stringify(stats));
}

/** A link report: to this process's metrics, and on the bus for the tuner and the progress line. */
export function publishLinkReport(bus: Bus, report: LinkReport): void {
  recordLinkReport(report);
  bus.nc.publish(linkSubject(report.migrationId), encodeLinkReport(report));
}

/**
 * A core NATS subscription whose messages are checked by `parse` before `onMessage` sees them; a
 * malformed one goes to `onMalformed`, or is dropped.
 */
export function subscribeParsed<T>(bus: Bus, subject: string, parse: (data: Uint8Array) => T, onMessage: (value: T) => void, onMalformed?: (err: unknown) => void): Subscription {
  return bus.nc.subscribe(subject, {
    callback: (err, msg) => {
      if (err) return;
      let value: T;
      try {
        value = parse(msg.data);
      } catch (e) {
        onMalformed?.(e);
        return;
      }
      onMessage(value);
    },
  });
}

/** An event, ridden through a bus outage like work (the events stream never fills: it drops its oldest). */
export async function publishEvent(bus: Bus, migrationId: string, event: MigrationEvent): Promise<void> {
  const data = encodeEvent(event);
  // a server configured below NATS_MAX_PAYLOAD_BYTES: said with the sizes, not as the client's "max_payload size exceeded"
  if (data.byteLength > bus.maxPayloadBytes) throw new Error(`${event.type} event of ${data.byteLength} bytes is more than the NATS server's max_payload of ${bus.maxPayloadBytes} bytes (this build expects ${NATS_MAX_PAYLOAD_BYTES})`);
  await publishWork(bus, eventSubject(migrationId, event.type), data);
}

/**
 * The migration's first event of `type`, published before or after the call, or undefined after
 * `timeoutMs`. A JetStream publish is a core NATS message on its subject before the stream stores
 * it: a subscription there gets an event published while this waits sooner than the stream's
 * ordered consumer would (capture holds its chunks until the tuner's first look arrives). The
 * consumer brings one published before the call. Without the stream (it could not be read), the
 * subscription may still answer; at the deadline the wait then fails with the stream's error.
 */
export function firstEvent<T extends MigrationEvent['type']>(bus: Bus, migrationId: string, type: T, timeoutMs: number): Promise<Extract<MigrationEvent, { type: T }> | undefined> {
  type Wanted = Extract<MigrationEvent, { type: T }>;
  const wanted = (data: Uint8Array): Wanted | undefined => {
    try {
      const event = parseEvent(data);
      return event.type === type ? (event as Wanted) : undefined;
    } catch {
      return undefined; // a malformed event is no answer: wait on
    }
  };
  const subject = eventSubject(migrationId, type);
  return new Promise((resolve, reject) => {
    let settled = false;
    let stopStream: (() => void) | undefined;
    let streamFailure: unknown;
    const finish = (event: Wanted | undefined): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      published.unsubscribe();
      stopStream?.();
      if (event === undefined && streamFailure !== undefined) reject(streamFailure);
      else resolve(event);
    };
    const timer = setTimeout(() => finish(undefined), timeoutMs);
    // subscribed first: an event published while the consumer is being made is not missed
    const published = bus.nc.subscribe(subject, {
      callback: (err, m) => {
        const event = err ? undefined : wanted(m.data);
        if (event) finish(event);
      },
    });
    void (async () => {
      const consumer = await bus.js.consumers.get(STREAMS.events, { filter_subjects: subject, deliver_policy: DeliverPolicy.All });
      const messages = await consumer.consume();
      stopStream = () => messages.stop();
      if (settled) messages.stop();
      for await (const m of messages) {
        const event = wanted(m.data);
        if (event) return finish(event);
      }
    })().catch((err: unknown) => (streamFailure = err));
  });
}

export type { JsMsg, MsgHdrs, NatsConnection };
