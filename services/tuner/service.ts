/**
 * Tuner actor: follows the statistics of adaptive migrations, decides at once when the sender has
 * probed the link, then every half second, and at once when the measured bandwidth moves by half
 * or more (not up to half a second later), writes the chosen mode to the config bucket, where
 * every stage picks it up from its next chunk, and how many of the running compress workers to use
 * to the workers bucket. Where its first look finds the link the bottleneck, it probes the ratios
 * of the migration's own pages: where the start mode is near the best, it decides at once and the
 * probe runs later in a process of its own at the lowest priority (probe-process.ts), else in this
 * process (in one of its own for a tuner that came late) while capture holds all but its first
 * chunks; where the cores are the bottleneck, later, at the lowest priority. A probe put off waits
 * for a look that finds the link the bottleneck.
 */
import { hostname } from 'node:os';
import { setTimeout as delay } from 'node:timers/promises';
import { connectBus, publishEvent } from '../../shared/bus/bus.js';
import { eventSubject } from '../../shared/bus/subjects.js';
import { errorMessage } from '../../shared/model/errors.js';
import type { RunningService } from '../../shared/actor/stage.js';
import { createLogger } from '../../shared/telemetry/log.js';
import { parseStats, type MigrationDescriptor, type StageStats, type TunerDecision } from '../../shared/model/migration.js';
import { startSpan } from '../../shared/telemetry/telemetry.js';
import { formatMode, type Mode, type ModeConfig } from '../../shared/model/mode.js';
import { DescriptorCache, ModeWatcher } from '../../shared/bus/registry.js';
import { PRESENCE_TTL_MS, PresenceView, setWantedWorkers, workersBucket } from '../../shared/bus/presence.js';
import { CpuSampler } from './cpu.js';
import { Tuner, clearlyLinkBound, linkBandwidthBps, putOffProbeStarts, startModeNearBest } from './core.js';
import { modeKey, pick, softMin, type Conditions, type Prediction } from './model.js';
import { probePlan, probeRatios, type ProbeImages, type ProbePlan, type ProbeResult } from './probe.js';
import { PROBE_NICE, runProbeProcess } from './probe-process.js';
import { loadProfile } from './profile.js';

const DECIDE_EVERY_MS = 500;

interface Followed {
  tuner: Tuner;
  startedMs: number;
  /** the sender's figure from ACKs (0 until it has one) */
  measuredBandwidthBps: number;
  /** the sender's probe of the link before chunks flowed */
  probedBandwidthBps: number;
  /** share of the last interval the sender found the link the bottleneck (undefined: not yet measured) */
  linkBoundShare?: number;
  lastStatsMs: number;
  /** the config last written (the mode and the compression for other deltas) */
  configWritten?: string;
  /** when the tuner saw the destination accept (undefined: it came later) */
  acceptedAtMs?: number;
  /**
   * the ratio probe, started or put off at the first look (so set once that look is done; the first
   * look always publishes its decision: capture waits for it): settled once its ratios are in use
   * (or it failed, or it was put off: see laterProbe)
   */
  probe?: Promise<void>;
  /** stops the probe running in the tuner's own process */
  probeHere?: AbortController;
  /** the probe the first look put off: it starts at a look past `dueMs` that finds the link the bottleneck */
  laterProbe?: { plan: ProbePlan; dueMs: number };
  /** the first look is waiting for the probe: other looks skip meanwhile */
  probeAwaiting?: boolean;
  /** the bandwidth the last look took, and when it was */
  lookedAt?: { bandwidthBps: number; atMs: number };
}

/**
 * The longest the first look waits for the ratio probe: in the tuner's process beside the
 * pipeline's head start it took 0.4-0.55 s of wall time on a one-core source at 5-25 Mbit/s; a
 * probe in a process of its own beside a running pipeline (a tuner that came after the accept)
 * took 1.4-2.9 s. Past that, the look decides on the profile's ratios, and later looks use the probe's.
 */
const PROBE_WAIT_MS = 2000;

/**
 * Where the cores are the bottleneck, or the start mode is near the best, the ratio probe's process
 * is put off: it starts at the first look at least this long after the first look that finds the link
 * the bottleneck (putOffProbeStarts). Ratios matter only once the link is the bottleneck, and then
 * only between modes the profile holds near one another; the process costs 0.3-0.4 s of CPU (node
 * and the modules) on the cores that are short. Started this long after the first look whatever the
 * link (with a CPU hog at 35 Mbit/s, where the link never was the bottleneck, it ran from 3.05 s to
 * the end of a 4.8-5 s transfer, unfinished), adaptive, staying in patch-3 throughout, took 0.6-0.9 s
 * more of the source's CPU than static patch-3, and 0.2-0.33 s longer. At 100 Mbit/s on one
 * core (a 1.6 s transfer) adaptive took 0.1 s and 0.4 s of CPU more than static patch-3 with it
 * started at once, at nice 19. In 5->35->5 Mbit/s runs on one core, started at once beside the
 * pipeline it ran from 0.25 s to 3-4 s, through the 35 Mbit/s window where the cores are short; the
 * transfer's median was 0.9-2.4% above static patch-3's, and 1.3-2.7% below it with the probe after this.
 */
const LATER_PROBE_AFTER_MS = 3000;

/** a first look this soon after the accept probes in the tuner's process (the pipeline has its head start only) */
const PROBE_HERE_WITHIN_MS = 2000;

/** how much smaller than thought a costly mode's ratio may prove to be: the probe leaves out those that could not win even so */
const COSTLY_RATIO_DOUBT = 0.8;

/** the wish is written again this long after its last write (it lives PRESENCE_TTL_MS) */
const WISH_REFRESH_MS = PRESENCE_TTL_MS / 3;

/** a bandwidth this far from the last look's is looked at once, not at the next half second */
const BANDWIDTH_CHANGE_FACTOR = 1.5;
/** ... but not twice within this */
const MIN_LOOK_GAP_MS = 100;

function imagesOf(d: MigrationDescriptor): ProbeImages {
  return { memory: d.memory, disk: d.disk, chunkPages: d.chunkPages };
}

/** the link's speed as the tuner takes it (see linkBandwidthBps) */
function bandwidthOf(f: Followed): number {
  return linkBandwidthBps(f.measuredBandwidthBps, f.probedBandwidthBps, f.linkBoundShare);
}

/** The `tuned` event's record of a look at `c` (at `nowMs`) from `from` to `to` (the same mode where it stays), before any prediction. */
function decisionRecord(f: Followed, nowMs: number, from: Mode, to: Mode, c: Conditions): TunerDecision {
  return {
    atSeconds: Number(((nowMs - f.startedMs) / 1000).toFixed(2)),
    from: formatMode(from),
    to: formatMode(to),
    bandwidthBps: Math.round(c.bandwidthBps),
    measuredBandwidthBps: Math.round(f.measuredBandwidthBps),
    ...(f.probedBandwidthBps > 0 ? { probedBandwidthBps: Math.round(f.probedBandwidthBps) } : {}),
    spareCores: Number(c.spareCores.toFixed(2)),
    compressWorkers: c.compressWorkers,
    predictedCurrentBlocksPerSec: 0,
    predictedChosenBlocksPerSec: 0,
  };
}

export async function runTunerService(natsUrl: string, profilePath?: string): Promise<RunningService> {
  const log = createLogger({ stage: 'tuner', instance: `${hostname()}:${process.pid}` });
  const profile = await loadProfile(profilePath);
  const bus = await connectBus(natsUrl, 'handoff-tuner');
  const followed = new Map<string, Followed>();
  const ignored = new Set<string>();
  /** compress workers running (their presence keys, from the view), at the last decision */
  let runningWorkers = 1;
  /** compress workers wanted in use, per followed migration; the bucket holds the largest */
  const wantedBy = new Map<string, number>();
  let wantedWritten: { workers: number | undefined; atMs: number } | undefined;
  const descriptors = await DescriptorCache.following(bus.migrations, (migrationId) => {
    followed.delete(migrationId);
    ignored.delete(migrationId);
    wantedBy.delete(migrationId);
  });
  const workers = await workersBucket(bus);
  const presence = await PresenceView.start(workers);
  const modes = await ModeWatcher.start(bus.config);
  const cpu = new CpuSampler();
  let spareCores = cpu.sample();
  let stopping = false;
  /** stops the ratio probes still running when the tuner stops */
  const probesRunning = new AbortController();

  const follow = async (migrationId: string): Promise<Followed | undefined> => {
    if (ignored.has(migrationId)) return undefined;
    let f = followed.get(migrationId);
    if (f) return f;
    const d = await descriptors.get(migrationId).catch(() => undefined);
    if (!d?.adaptive) {
      ignored.add(migrationId);
      return undefined;
    }
    // another statistic may have started following while the descriptor was read: one tuner per migration
    f = followed.get(migrationId);
    if (f) return f;
    const followedMs = performance.now();
    f = { tuner: new Tuner(profile), startedMs: followedMs, measuredBandwidthBps: 0, probedBandwidthBps: 0, lastStatsMs: followedMs };
    followed.set(migrationId, f);
    log.info('following', { migration: migrationId, profile: profile.workload });
    return f;
  };

  /**
   * Every mode's ratio on the migration's own pages, into its tuner: `where` runs the probe (in
   * the tuner's process, or in a process of its own at a nice value); a probe `stopped` has nothing to say
   */
  const useProbe = (migrationId: string, f: Followed, where: string, run: () => Promise<ProbeResult | undefined>, stopped?: AbortSignal): Promise<void> => {
    const startedMs = performance.now();
    const tuner = f.tuner;
    return run()
      .then((probe) => {
        if (stopped?.aborted) return; // the first look handed it to a process
        if (!probe) {
          log.info('ratio probe found too few changed pages, profile ratios kept', { migration: migrationId });
          return;
        }
        tuner.useProbedRatios(probe.ratios);
        const shown = (mode: Mode): string => `${formatMode(mode)} ${(tuner.ratioBasisOf(mode) ?? 0).toFixed(3)}`;
        log.info('ratios probed', {
          migration: migrationId,
          where,
          blocks: probe.blocks,
          pagesRead: probe.pagesRead,
          cpuMs: Math.round(probe.cpuMs),
          wallMs: Math.round(performance.now() - startedMs),
          modes: probe.ratios.size,
          smallest: shown([...profile.modes].sort((a, b) => (tuner.ratioBasisOf(a.mode) ?? 1) - (tuner.ratioBasisOf(b.mode) ?? 1))[0]!.mode),
        });
        log.debug('probed ratios', { migration: migrationId, ratios: profile.modes.map((m) => shown(m.mode)).join(', ') });
      })
      .catch((err: unknown) => {
        if (!stopping) log.warn('ratio probe failed, profile ratios kept', { migration: migrationId, reason: errorMessage(err) });
      });
  };
  /** the probe in a process of its own, at `nice` */
  const probeProcess = (migrationId: string, d: MigrationDescriptor, f: Followed, plan: ProbePlan, nice: number): Promise<void> =>
    useProbe(migrationId, f, `process at nice ${nice}`, async () => (await runProbeProcess({ images: imagesOf(d), plan }, nice, probesRunning.signal)).probe);

  /** the probe of `plan`, put off (see LATER_PROBE_AFTER_MS): the first look is done without it */
  const putOffProbe = (f: Followed, plan: ProbePlan, nowMs: number): void => {
    f.probe = Promise.resolve();
    f.laterProbe = { plan, dueMs: nowMs + LATER_PROBE_AFTER_MS };
  };

  /**
   * The probe of `plan`'s modes in this process, yielding between modes (a process of its own took
   * 0.25-0.35 s to start and load its modules on an idle core, more than the probe's own work).
   */
  const probeHere = (migrationId: string, d: MigrationDescriptor, f: Followed, plan: ProbePlan): void => {
    const here = (f.probeHere = new AbortController());
    f.probe = useProbe(migrationId, f, 'here', () => probeRatios(imagesOf(d), plan, { shareWith: here.signal }), here.signal).finally(() => {
      if (f.probeHere === here) f.probeHere = undefined;
    });
  };

  // The destination has accepted an adaptive migration: the tuner follows it from now (its first
  // look, at the sender's link probe, may probe the ratios in this process: see decideFor).
  const acceptedSub = bus.nc.subscribe(eventSubject('*', 'accepted'), {
    callback: (err, msg) => {
      if (err) return;
      const migrationId = msg.subject.split('.')[2];
      if (!migrationId) return;
      void follow(migrationId)
        .then((f) => {
          if (f) f.acceptedAtMs ??= performance.now();
        })
        .catch((err: unknown) => log.debug('not followed from its accept', { migration: migrationId, reason: errorMessage(err) }));
    },
  });

  const sub = bus.nc.subscribe('handoff.stats.>', {
    callback: (err, msg) => {
      if (err) return;
      let s: StageStats;
      try {
        s = parseStats(msg.data);
      } catch {
        return;
      }
      void follow(s.migrationId).then((f) => {
        if (!f) return;
        f.lastStatsMs = performance.now();
        if (s.counts?.probe) {
          // before any chunk: the first decision need not wait for ACKs
          f.probedBandwidthBps = s.counts.bandwidthBps ?? 0;
          if (f.measuredBandwidthBps === 0 && f.probedBandwidthBps > 0) decideFor(s.migrationId, f);
          return;
        }
        f.tuner.observe(s);
        if (s.stage === 'sender' && s.counts?.bandwidthBps) {
          // the sender counts only the time the link had frames to carry: its figure is the
          // link's rate even while the pipeline is the bottleneck (no guess from the idle share)
          f.measuredBandwidthBps = s.counts.bandwidthBps;
          f.linkBoundShare = (s.counts.linkBoundPct ?? 100) / 100;
          const last = f.lookedAt;
          const nowBps = bandwidthOf(f);
          const factor = last ? Math.max(nowBps / last.bandwidthBps, last.bandwidthBps / nowBps) : 1;
          if (last && factor >= BANDWIDTH_CHANGE_FACTOR && performance.now() - last.atMs >= MIN_LOOK_GAP_MS) decideFor(s.migrationId, f);
        }
      });
    },
  });

  /** the wish, written when it changes and again well inside its age (it expires with the entry if the tuner stops) */
  const writeWanted = async (): Promise<void> => {
    const wanted = wantedBy.size > 0 ? Math.max(...wantedBy.values()) : undefined;
    const now = performance.now();
    if (wantedWritten === undefined ? wanted === undefined : wantedWritten.workers === wanted && (wanted === undefined || now - wantedWritten.atMs < WISH_REFRESH_MS)) return;
    await setWantedWorkers(workers, 'compress', wanted);
    wantedWritten = { workers: wanted, atMs: now };
  };

  const decideFor = (migrationId: string, f: Followed): void => {
    // the look's time; a first look that waits for the ratio probe moves it to when it decides
    let now = performance.now();
    f.lookedAt = { bandwidthBps: bandwidthOf(f), atMs: now };
    void descriptors
      .get(migrationId)
      .then(async (d) => {
        runningWorkers = Math.max(1, presence.live('compress').length || runningWorkers);
        if (f.probeAwaiting) return; // the look waiting for the ratio probe decides
        const conditionsNow = (): Conditions => ({ bandwidthBps: bandwidthOf(f), spareCores, compressWorkers: runningWorkers });
        // Ratios decide only where the link is the bottleneck. A first look that finds it so, with
        // the start mode far from the best, waits for the probe of the modes that could win
        // (PROBE_WAIT_MS at most; the costly ones only
        // where they could win even with a ratio a fifth better than thought, not zstd-19 at 25
        // Mbit/s on one core): deciding on the profile's ratios first started programs' pages at
        // 10 Mbit/s on xor+zstd-19, whose first chunks on one core held the link back by half a
        // second; deciding on the cheap modes' ratios alone decided before patch-9's and
        // patch-19's were in, and switching later took two more looks. It runs in this process
        // where the look comes soon after the accept (the pipeline has only its head start to
        // do), else in a process of its own. One that finds the cores the bottleneck leaves them
        // to the pipeline: the probe runs later at the lowest priority, for when the link becomes
        // the bottleneck and leaves the cores idle (started at the accept and stopped here, it took
        // 0.1 s of CPU on a one-core source at 100 Mbit/s, 6% of the transfer). The link must be the
        // bottleneck by a margin: this look prices the modes on the profile's costs, and a link probe
        // that read 50-60 Mbit/s of a 100 Mbit/s link from a one-core source passed for one by a few
        // percent there; capture then waited 0.9-1.4 s for ratios that decided nothing (the cores were)
        const firstLook = !f.probe;
        let probeWaitSeconds: number | undefined;
        if (firstLook) {
          const predicted = f.tuner.predictNow(conditionsNow());
          const best = pick(predicted);
          if (clearlyLinkBound(best)) {
            const couldWin = new Set(
              predicted.filter((p) => best && softMin(p.processingBlocksPerSec, p.networkBlocksPerSec / COSTLY_RATIO_DOUBT) > best.blocksPerSec).map((p) => modeKey(p.mode)),
            );
            const plan = probePlan(profile, (m) => couldWin.has(modeKey(m)));
            // where the start mode is near the best (see startModeNearBest), this look decides at once
            // on the profile's ratios and capture goes on; the probe comes later, for the looks after
            const start = modes.get(migrationId, d.mode);
            if (startModeNearBest(predicted.find((p) => modeKey(p.mode) === modeKey(start)), best)) {
              putOffProbe(f, plan, now);
            } else {
              if (f.acceptedAtMs !== undefined && now - f.acceptedAtMs < PROBE_HERE_WITHIN_MS) probeHere(migrationId, d, f, plan);
              else f.probe = probeProcess(migrationId, d, f, plan, 0);
              f.probeAwaiting = true;
              await Promise.race([f.probe, delay(PROBE_WAIT_MS)]).finally(() => (f.probeAwaiting = false));
              // the look decides now, on what the link and the probe say now: its record says so
              const waitedFromMs = now;
              now = performance.now();
              probeWaitSeconds = Number(((now - waitedFromMs) / 1000).toFixed(2));
            }
          } else putOffProbe(f, probePlan(profile), now);
        }
        const current: Mode = modes.get(migrationId, d.mode);
        const conditions = conditionsNow();
        const decision = f.tuner.decide(current, conditions, now);
        const mode = decision?.to ?? current;
        const inUse = f.tuner.workersWanted(mode, conditions, f.linkBoundShare);
        const look = f.tuner.lastLook;
        if (f.laterProbe && putOffProbeStarts(f.laterProbe.dueMs, now, pick(look?.top ?? []), f.linkBoundShare)) {
          f.probe = probeProcess(migrationId, d, f, f.laterProbe.plan, PROBE_NICE);
          f.laterProbe = undefined;
        }
        const shown = (p: Prediction): string => `${formatMode(p.mode)} ${Math.round(p.processingBlocksPerSec)}/${Math.round(p.networkBlocksPerSec)}`;
        log.debug('look', {
          migration: migrationId,
          atSeconds: Number(((now - f.startedMs) / 1000).toFixed(2)),
          bandwidthBps: Math.round(conditions.bandwidthBps),
          measuredBandwidthBps: Math.round(f.measuredBandwidthBps),
          linkBoundShare: f.linkBoundShare,
          spareCores: Number(spareCores.toFixed(2)),
          fixedCpuMsPerBlock: Number((look?.fixedCpuMsPerBlock ?? 0).toFixed(4)),
          overheadCpuMsPerBlock: Number((look?.overheadCpuMsPerBlock ?? 0).toFixed(4)),
          // blocks/s each could process / the link could carry
          current: look?.current ? shown(look.current) : '-',
          top: look?.top.map(shown).join(', ') ?? '-',
          // CPU ms a block of the current mode and the top three: delta + compress + unreported
          costs: f.tuner
            .costs()
            .filter((c) => [current, ...(look?.top.map((p) => p.mode) ?? [])].some((m) => modeKey(m) === modeKey(c.mode)))
            .map((c) => `${formatMode(c.mode)} ${c.deltaCpuMsPerBlock.toFixed(3)}+${c.compressCpuMsPerBlock.toFixed(3)}+${(c.overheadCpuMsPerBlock ?? 0).toFixed(3)}`)
            .join(', '),
        });
        const workersChanged = wantedBy.get(migrationId) !== inUse;
        wantedBy.set(migrationId, inUse);
        // the compression for chunks of other deltas follows the conditions between switches too: after
        // a switch at 5 Mbit/s it said zstd-19 for the xor-encoded chunks queued at compress, and when
        // the link went to 35 a few hundred ms later they were still compressed at zstd-19 on one core
        const config = JSON.stringify({ ...mode, compressFor: look?.compressFor ?? {} } satisfies ModeConfig);
        if (decision || (f.configWritten !== undefined && config !== f.configWritten)) {
          await bus.config.put(migrationId, config);
          f.configWritten = config;
        }
        if (!decision && !workersChanged && !firstLook) return;
        const record: TunerDecision = {
          ...decisionRecord(f, now, current, mode, conditions),
          ...(probeWaitSeconds !== undefined ? { probeWaitSeconds } : {}),
          compressWorkersInUse: inUse,
          overheadCpuMsPerBlock: Number(f.tuner.overheadCpuMsPerBlock.toFixed(4)),
          predictedCurrentBlocksPerSec: Math.round(decision?.currentBlocksPerSec ?? 0),
          predictedChosenBlocksPerSec: Math.round(decision?.chosenBlocksPerSec ?? 0),
        };
        // capture waits for the first one, with its chunks held: published before the log and the wish
        // (its subscription has it a hop later, see firstEvent), after the config its stages follow
        const published = publishEvent(bus, migrationId, { type: 'tuned', decision: record });
        log.info(decision ? 'switching mode' : 'compress workers in use', { migration: migrationId, ...record });
        startSpan('tuner decision', d.traceparent, { 'handoff.actor': 'tuner', ...Object.fromEntries(Object.entries(record).map(([k, v]) => [`handoff.${k}`, v])) }).end();
        if (workersChanged) await writeWanted().catch((err: unknown) => log.debug('wish not written', { reason: errorMessage(err) }));
        await published;
      })
      .catch((err: unknown) => log.warn('decision failed', { migration: migrationId, reason: errorMessage(err) }));
  };

  const timer = setInterval(() => {
    spareCores = cpu.sample();
    // the handoff's own CPU, shared among the followed migrations by the blocks each sent
    const blocksOut = [...followed.values()].reduce((a, f) => a + f.tuner.blocksSinceOwnCpu, 0);
    for (const f of followed.values()) f.tuner.observeOwnCpu(blocksOut > 0 ? (cpu.ownCpuMs * f.tuner.blocksSinceOwnCpu) / blocksOut : cpu.ownCpuMs / followed.size, f.linkBoundShare);
    const now = performance.now();
    for (const [migrationId, f] of followed) {
      if (now - f.lastStatsMs > 60_000) {
        followed.delete(migrationId); // finished or abandoned
        continue;
      }
      if (bandwidthOf(f) <= 0) continue; // nothing measured on the link yet
      decideFor(migrationId, f);
    }
    for (const migrationId of wantedBy.keys()) if (!followed.has(migrationId)) wantedBy.delete(migrationId);
    writeWanted().catch((err: unknown) => log.debug('wish not written', { reason: errorMessage(err) }));
  }, DECIDE_EVERY_MS);

  let resolveDone: () => void = () => undefined;
  const done = new Promise<void>((resolve) => (resolveDone = resolve));
  log.info('ready', { profile: profile.workload, modes: profile.modes.length });
  return {
    ready: () => bus.connected(),
    done,
    stop: async () => {
      stopping = true;
      clearInterval(timer);
      sub.unsubscribe();
      acceptedSub.unsubscribe();
      // every worker in use again
      await setWantedWorkers(workers, 'compress', undefined).catch(() => undefined);
      modes.stop();
      descriptors.stop();
      presence.stop();
      probesRunning.abort();
      for (const f of followed.values()) f.probeHere?.abort();
      await bus.close();
      resolveDone();
    },
  };
}
