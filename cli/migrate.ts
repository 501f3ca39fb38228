/**
 * `handoff migrate`: the control path at the source. Checks the images, registers the migration,
 * starts the actors (unless they run already as services), follows events and statistics, and
 * returns the summary.
 */
import { randomBytes } from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import { DeliverPolicy } from '@nats-io/jetstream';
import { checkImage, loadBaseIndex } from '../shared/image/base-index.js';
import { connectBus, publishEvent, subscribeParsed, type Bus } from '../shared/bus/bus.js';
import { BadImageError, errorMessage } from '../shared/model/errors.js';
import { linkSecurityFromEnv } from '../shared/wire/link-security.js';
import { createLogger, type Logger } from '../shared/telemetry/log.js';
import { parseEvent, parseStats, type LiveVm, type MigrationDescriptor, type MigrationEvent, type TunerDecision } from '../shared/model/migration.js';
import { QmpClient } from '../shared/vm/qmp.js';
import type { Mode } from '../shared/model/mode.js';
import { startEmbeddedNats, type EmbeddedNats } from '../shared/bus/nats-server.js';
import { PAGE_SIZE } from '../shared/image/pages.js';
import { STREAMS, eventSubject, linkSubject, statsSubject } from '../shared/bus/subjects.js';
import { parseLinkReport } from '../shared/model/link-report.js';
import { runTunerService } from '../services/tuner/service.js';
import type { Span } from '@opentelemetry/api';
import { startSpan, traceparentOf } from '../shared/telemetry/telemetry.js';
import { spawnActor, stopActors, type ActorProcess } from './actors.js';
import { ProgressBar } from './progress.js';
import { StatsCollector, qemuSummary, type MigrationSummary } from './summary.js';
import { readlink } from 'node:fs/promises';
import { resolve } from 'node:path';
import { readBase, type BaseFolder } from '../shared/vm/base-manifest.js';
import { compareMachines, describeMachine } from '../shared/vm/qemu-process.js';
import { findQemuBehind, MIGRATION_ACTIVE } from '../shared/vm/qemu-migration.js';
import type { StreamLiveVm } from '../services/capture/stream.js';

export interface MigrateOptions {
  baseMemory: string;
  memory: string;
  baseDisk: string;
  disk: string;
  to: string;
  mode: Mode;
  /** the tuner chooses the mode as the migration runs, starting from `mode` */
  adaptive?: boolean;
  compressWorkers: number;
  dedupInstances: number;
  bandwidthCapBps: number;
  natsUrl?: string;
  /** false: the actors already run as services on the bus */
  spawnActors: boolean;
  progress: boolean;
  migrationId?: string;
  /** largest dirty pages per capture chunk (default: what the server's max_payload allows, up to 256) */
  chunkPages?: number;
  /** how long a lost WAN link may take to come back (default 60 s) */
  linkDeadlineMs?: number;
  /** a running VM (memory = its shared RAM file, disk = its disk): pre-copy, stop, resume there */
  live?: LiveVm;
  /**
   * Ends the handoff early (SIGTERM, Ctrl-C): its actors and nats-server stop with it, and the
   * summary says it was stopped. A live VM the source stopped is left stopped: the destination may
   * have had the go and resumed it, and two running copies are worse than none.
   */
  stop?: AbortSignal;
  /** called once the migration runs (tests change the mode mid-way through it) */
  onStarted?: (ctl: { bus: Bus; migrationId: string; stats: StatsCollector; actors: readonly ActorProcess[] }) => void;
}

/** Pages per chunk so that a capture chunk (pages + 38 bytes of columns each + header) fits max_payload. */
export function chunkPagesFor(maxPayloadBytes: number, cap = 256): number {
  return Math.max(1, Math.min(cap, Math.floor((maxPayloadBytes - 16 * 1024) / (PAGE_SIZE + 64))));
}

export function newMigrationId(): string {
  return `m-${new Date().toISOString().replace(/[-:T.Z]/g, '').slice(0, 14)}-${randomBytes(3).toString('hex')}`;
}

async function checkPair(base: string, current: string, what: string): Promise<number> {
  const [baseBytes, currentBytes] = await Promise.all([checkImage(base, `base ${what} image`), checkImage(current, `${what} image`)]);
  if (baseBytes !== currentBytes) throw new BadImageError(`${what} image ${current} is ${currentBytes} bytes but its base ${base} is ${baseBytes}: sizes must match`);
  return currentBytes;
}

/** A handoff stopped (by its `stop` signal) before it started. */
export class MigrationStoppedError extends Error {
  constructor() {
    super('the handoff was stopped (by a signal) before it started');
    this.name = 'MigrationStoppedError';
  }
}

/** resolves false once `signal` aborts (never, without one) */
function stopped(signal: AbortSignal | undefined): Promise<false> {
  return new Promise((resolve) => signal?.addEventListener('abort', () => resolve(false), { once: true }));
}

/** the longest a migration waits for the actors it spawned to take work before it starts */
const ACTORS_READY_WAIT_MS = 30_000;

export async function migrate(options: MigrateOptions): Promise<MigrationSummary> {
  const migrationId = options.migrationId ?? newMigrationId();
  const log = createLogger({ stage: 'control', migration: migrationId });
  // stream mode: memory comes from QEMU's stream, laid out as the base's memory image: no current file
  const streamMode = options.live?.machine !== undefined;
  const [memoryBytes, diskBytes] = await Promise.all([
    streamMode ? checkImage(options.baseMemory, 'base memory image') : checkPair(options.baseMemory, options.memory, 'memory'),
    checkPair(options.baseDisk, options.disk, 'disk'),
  ]);
  // the sender we start reads the link's credentials from our environment: a missing one is said now
  if (options.spawnActors) linkSecurityFromEnv();
  const [memoryIndex, diskIndex] = await Promise.all([loadBaseIndex(options.baseMemory), loadBaseIndex(options.baseDisk)]);

  let nats: EmbeddedNats | undefined;
  let bus: Bus | undefined;
  let actors: ActorProcess[] = [];
  let tuner: { stop(): Promise<void> } | undefined;
  let rootSpan: Span | undefined;
  const started = performance.now();
  try {
    if (!options.natsUrl) nats = await startEmbeddedNats();
    const natsUrl = options.natsUrl ?? nats!.url;
    bus = await connectBus(natsUrl, 'handoff-control');
    const chunkPages = options.chunkPages ?? chunkPagesFor(bus.maxPayloadBytes);
    // the migration's trace is rooted here; actors find its context in the descriptor
    rootSpan = startSpan('handoff', undefined, { 'handoff.migration': migrationId, 'handoff.destination': options.to, 'handoff.actor': 'control' });
    const rootTraceparent = rootSpan.isRecording() ? traceparentOf(rootSpan) : undefined;
    /** about 64 traced chunks per migration, whatever its size (a span per chunk would swamp a trace) */
    const traceEvery = (imageBytes: number): number => Math.max(1, Math.floor(imageBytes / PAGE_SIZE / chunkPages / 64));
    const descriptor: MigrationDescriptor = {
      migrationId,
      createdAtMs: Date.now(),
      memory: { base: options.baseMemory, current: streamMode ? '' : options.memory, baseHash: memoryIndex.contentHash, bytes: memoryBytes },
      disk: { base: options.baseDisk, current: options.disk, baseHash: diskIndex.contentHash, bytes: diskBytes },
      destination: options.to,
      parts: options.dedupInstances,
      chunkPages,
      bandwidthCapBps: options.bandwidthCapBps,
      mode: options.mode,
      adaptive: options.adaptive ?? false,
      ...(options.linkDeadlineMs ? { linkDeadlineMs: options.linkDeadlineMs } : {}),
      ...(rootTraceparent ? { traceparent: rootTraceparent, traceEveryChunks: traceEvery(memoryBytes + diskBytes) } : {}),
      ...(options.live ? { live: options.live } : {}),
    };
    await bus.migrations.put(migrationId, JSON.stringify(descriptor));
    await bus.config.put(migrationId, JSON.stringify(options.mode));
    if (options.spawnActors) {
      actors = [
        spawnActor('capture', natsUrl),
        ...Array.from({ length: options.dedupInstances }, (_, i) => spawnActor('dedup', natsUrl, { partition: i })),
        spawnActor('delta', natsUrl),
        ...Array.from({ length: options.compressWorkers }, () => spawnActor('compress', natsUrl)),
        spawnActor('sender', natsUrl),
      ];
      // the tuner is light: it runs in this process, saving a process start on a short handoff
      if (options.adaptive) tuner = await runTunerService(natsUrl, process.env.HANDOFF_PROFILE);
      for (const a of actors) {
        a.child.once('exit', (code, signal) => {
          if (code !== 0 && signal !== 'SIGTERM') log.warn('actor exited', { actor: a.name, code, signal });
        });
      }
      // The handoff starts once they take work: a sender probing the link while the others still
      // start on the same cores reads it far too slow, and adaptive would choose for that.
      const allReady = Promise.all(actors.map((a) => a.ready)).then(() => true);
      const ready = await Promise.race([allReady, delay(ACTORS_READY_WAIT_MS, false, { ref: false }), stopped(options.stop)]);
      if (!ready && !options.stop?.aborted) log.warn('actors not all ready: starting anyway', { waitedMs: ACTORS_READY_WAIT_MS });
    }
    if (options.stop?.aborted) throw new MigrationStoppedError();

    const stats = new StatsCollector();
    const statsSub = subscribeParsed(bus, statsSubject(migrationId, '*'), parseStats, (s) => stats.add(s), (e) => log.warn('malformed statistics ignored', { reason: errorMessage(e) }));
    const linkSub = subscribeParsed(bus, linkSubject(migrationId), parseLinkReport, (r) => stats.addLinkReport(r), (e) => log.warn('malformed link report ignored', { reason: errorMessage(e) }));
    const events = await (await bus.js.consumers.get(STREAMS.events, { filter_subjects: eventSubject(migrationId, '*'), deliver_policy: DeliverPolicy.All })).consume();
    await publishEvent(bus, migrationId, { type: 'start' });
    log.info('started', { destination: options.to, mode: options.mode });
    options.onStarted?.({ bus, migrationId, stats, actors });

    const bar = options.progress ? new ProgressBar(migrationId) : undefined;
    let captured: Extract<MigrationEvent, { type: 'captured' }> | undefined;
    /** dirty pages over every round */
    let capturedPages = 0;
    const totalBytes = memoryBytes + diskBytes;
    const ticker = setInterval(() => {
      // before capture ends the slice total is estimated from how much of the images it has read
      const scanned = stats.scannedBytes / totalBytes;
      const totalSlices = captured ? captured.slices : scanned > 0 ? stats.emittedSlices / scanned : 0;
      const fraction = totalSlices > 0 ? Math.min(0.99, (stats.stages.sender?.chunks ?? 0) / totalSlices) : 0;
      bar?.update({ fraction, phase: captured ? 'sending' : 'capturing', wireBytes: stats.wireBytes, linkRateBps: stats.measuredBandwidthBps });
    }, 200);

    let outcome: MigrationEvent | undefined;
    let acceptedMs: number | undefined;
    const decisions: TunerDecision[] = [];
    // the events end (and the loop with them) when the handoff is stopped
    const stopEvents = (): void => void events.stop();
    options.stop?.addEventListener('abort', stopEvents, { once: true });
    if (options.stop?.aborted) stopEvents();
    try {
      for await (const m of events) {
        let event: MigrationEvent;
        try {
          event = parseEvent(m.data);
        } catch (err) {
          log.warn('malformed event ignored', { subject: m.subject, reason: errorMessage(err) });
          continue;
        }
        if (event.type === 'accepted') acceptedMs ??= performance.now();
        if (event.type === 'captured') {
          captured = event;
          capturedPages += event.dirtyPages;
        }
        if (event.type === 'tuned') decisions.push(event.decision);
        if (event.type === 'result' || event.type === 'failed' || event.type === 'refused') {
          outcome = event;
          break;
        }
      }
    } finally {
      options.stop?.removeEventListener('abort', stopEvents);
      clearInterval(ticker);
      bar?.done();
    }
    if (!outcome && options.stop?.aborted) log.warn('stopped before the destination\'s result', { phase: captured ? 'sending' : 'capturing' });
    const endMs = performance.now();
    const handoffSeconds = (endMs - started) / 1000;
    // statistics of the last chunks can trail the result by a moment
    await bus.nc.flush();
    await new Promise((r) => setTimeout(r, 100));
    statsSub.unsubscribe();
    linkSub.unsubscribe();
    const summary: MigrationSummary = {
      migrationId,
      verified: outcome?.type === 'result' && outcome.result.verified,
      handoffSeconds,
      transferSeconds: acceptedMs === undefined ? 0 : (endMs - acceptedMs) / 1000,
      inputBytes: capturedPages * PAGE_SIZE,
      wireBytes: stats.wireBytes,
      scannedBytes: captured?.scannedBytes ?? stats.scannedBytes,
      dirtyPages: capturedPages,
      effectiveBps: handoffSeconds > 0 ? (stats.wireBytes * 8) / handoffSeconds : 0,
      measuredBandwidthBps: stats.measuredBandwidthBps,
      modes: [...stats.chunksByMode.keys()],
      chunksByMode: Object.fromEntries(stats.chunksByMode),
      adaptive: options.adaptive ?? false,
      decisions,
      stages: stats.stages,
      ...(captured ? { sourceHashes: captured.imageHashes } : {}),
    };
    rootSpan.setAttributes({ 'handoff.verified': summary.verified, 'handoff.wire_bytes': summary.wireBytes, 'handoff.seconds': handoffSeconds });
    if (outcome?.type === 'result') {
      summary.rebuild = outcome.result;
      if (!outcome.result.verified) summary.reason = outcome.result.reason ?? 'destination could not verify the images';
    } else if (outcome?.type === 'failed') summary.reason = `${outcome.stage}: ${outcome.reason}`;
    else if (outcome?.type === 'refused') summary.reason = `destination refused: ${outcome.reason}`;
    else if (options.stop?.aborted) summary.reason = 'stopped (by a signal) before the destination\'s result';
    if (options.live) await settleLiveVm(options.live, summary, captured, outcome, log, options.stop?.aborted ?? false);
    return summary;
  } finally {
    rootSpan?.end();
    await tuner?.stop();
    await stopActors(actors);
    await bus?.migrations.delete(migrationId).catch(() => undefined);
    await bus?.close();
    await nats?.stop();
  }
}

/**
 * After a live handoff: the summary's rounds and downtime, and the source VM's fate. It runs again
 * unless the destination may have resumed it: never two running copies (and never none, unless
 * the link failed in the instant between the go and the destination's answer: then it says so).
 */
async function settleLiveVm(live: LiveVm, summary: MigrationSummary, captured: Extract<MigrationEvent, { type: 'captured' }> | undefined, outcome: MigrationEvent | undefined, log: Logger, interrupted: boolean): Promise<void> {
  if (captured?.rounds) summary.rounds = captured.rounds;
  if (live.machine) summary.qemu = qemuSummary(captured?.rounds ?? [], live.autoConverge !== false);
  const stopped = captured?.final !== false && captured?.stoppedAtMs !== undefined;
  const result = outcome?.type === 'result' ? outcome.result : undefined;
  if (result?.resumedAtMs !== undefined && stopped) {
    summary.downtimeMs = result.resumedAtMs - captured!.stoppedAtMs!;
    summary.sourceVm = 'stopped';
    return;
  }
  if (outcome?.type === 'failed' && outcome.committed) {
    summary.sourceVm = 'stopped';
    return;
  }
  if (!stopped) {
    // capture resumes the VM itself if it fails after stopping it
    summary.sourceVm = 'running';
    return;
  }
  if (interrupted && !outcome) {
    // the go may have crossed: the destination may run it
    summary.sourceVm = 'stopped';
    summary.reason = `${summary.reason ?? 'stopped'}; the source VM stopped for the switch and is left stopped: the destination may have resumed it`;
    log.warn('stopped mid-switch: source VM left stopped', { reason: summary.reason });
    return;
  }
  const why = result?.vmError ?? summary.reason ?? 'the destination did not resume the VM';
  try {
    const qmp = await QmpClient.connect(live.qmpSocket, 10_000);
    await qmp.execute('cont');
    qmp.close();
    summary.sourceVm = 'resumed';
    summary.verified = false;
    summary.reason = `${why}; the source VM runs again`;
    log.warn('handoff failed: source VM resumed', { reason: why });
  } catch (err) {
    summary.sourceVm = 'stopped';
    summary.reason = `${why}; the source VM could not be resumed either: ${errorMessage(err)}`;
  }
}

/** A VM that cannot be handed off from its own migration stream as asked; the message names why. */
export class StreamSourceError extends Error {
  override name = 'StreamSourceError';
}

export interface StreamSource {
  /** the running VM's QMP socket */
  qmpSocket: string;
  /** the base folder (`handoff base --out`) every cloudlet holds */
  baseDir: string;
  downtimeMs: number;
  maxRounds: number;
  autoConverge: boolean;
}

/** What `migrate` hands off in stream mode: the images as MigrateOptions names them, and the live VM. */
export interface StreamHandoff {
  base: BaseFolder;
  baseMemory: string;
  baseDisk: string;
  disk: string;
  live: StreamLiveVm;
}

/** QEMU's runstates a handoff cannot start from, with why. */
const REFUSED_RUNSTATES: Record<string, string> = {
  inmigrate: 'it is waiting for an incoming migration (-incoming)',
  postmigrate: 'it was migrated away and is stopped (postmigrate)',
  'finish-migrate': 'a migration is finishing',
};

/**
 * The checks before any page moves: the base is whole, the VM behind the socket is the base's
 * machine (compared from the command lines), it has one disk (drive 0, raw) the base holds a copy
 * of, and it runs with no migration under way. Refuses naming what differs.
 */
export async function prepareStreamHandoff(source: StreamSource): Promise<StreamHandoff> {
  const base = await readBase(source.baseDir);
  const { manifest } = base;
  const qemu = findQemuBehind(source.qmpSocket, (m) => new StreamSourceError(m));
  const machine = describeMachine(qemu.argv);
  // compareMachines speaks of a source and a destination: here they are the VM and its base
  const differences = compareMachines(machine, manifest.machine).map((d) => d.replace(/\b(the )?source\b/g, 'the VM').replace(/\b(the )?destination\b/g, 'the base'));
  if (differences.length) throw new StreamSourceError(`the VM behind ${source.qmpSocket} is not the machine of the base ${source.baseDir}: ${differences.join('; ')}`);
  const drives = machine.drives.map((d, i) => ({ ...d, drive: i })).filter((d) => d.file);
  const name = (d: (typeof drives)[number]): string => `drive ${d.drive} (if=${d.interface}, ${d.file})`;
  if (drives.length === 0) throw new StreamSourceError(`the VM behind ${source.qmpSocket} has no disk: a stream handoff needs one (drive 0) for now`);
  if (drives.length > 1) throw new StreamSourceError(`the VM behind ${source.qmpSocket} has ${drives.length} disks: a stream handoff takes one (drive 0) for now, not ${drives.slice(1).map(name).join(', ')}`);
  const drive = drives[0]!;
  if (drive.drive !== 0) throw new StreamSourceError(`${name(drive)}: a stream handoff takes drive 0 for now`);
  const baseDisk = manifest.disks.find((d) => d.drive === drive.drive);
  if (!baseDisk) throw new StreamSourceError(`the base ${source.baseDir} holds no copy of ${name(drive)}`);
  if (baseDisk.format !== 'raw') throw new StreamSourceError(`${name(drive)} is ${baseDisk.format}: a stream handoff takes raw disks only for now`);
  const cwd = await readlink(`/proc/${qemu.pid}/cwd`);
  const disk = resolve(cwd, drive.file!);

  const qmp = await QmpClient.connect(source.qmpSocket, 2000).catch((err: unknown) => {
    throw new StreamSourceError(`QEMU does not answer on the QMP socket ${source.qmpSocket}: ${errorMessage(err)} (QEMU serves one QMP client per socket: is another one connected?)`);
  });
  try {
    const status = await qmp.execute('query-status');
    const refused = REFUSED_RUNSTATES[status.status];
    if (refused) throw new StreamSourceError(`cannot hand off the VM behind ${source.qmpSocket}: ${refused}`);
    const current = await qmp.execute('query-migrate');
    if (current.status && MIGRATION_ACTIVE.has(current.status)) throw new StreamSourceError(`a migration is already running on the VM behind ${source.qmpSocket} (status ${current.status})`);
  } finally {
    // capture connects on its own: QEMU serves one QMP client at a time
    qmp.close();
  }
  return {
    base,
    baseMemory: base.memoryPath,
    baseDisk: base.diskPaths[manifest.disks.indexOf(baseDisk)]!,
    disk,
    live: {
      qmpSocket: source.qmpSocket,
      baseDeviceState: base.deviceStatePath,
      downtimeMs: source.downtimeMs,
      maxRounds: source.maxRounds,
      machine: { argv: qemu.argv, ramBlocks: manifest.ramBlocks },
      autoConverge: source.autoConverge,
    },
  };
}
