/**
 * Tuner actor: follows the statistics of adaptive migrations, looks at once when the sender has
 * probed the link, then every `lookEveryMs`, and at once when the measured bandwidth moves far
 * enough; writes the chosen mode to the config bucket, where every stage picks it up from its next
 * chunk, and how many of the running compress workers to use to the workers bucket. Where its first
 * look finds the link the bottleneck, it probes the ratios of the migration's own pages (probes.ts).
 * The estimator (estimator.ts) prices the modes, the pure policy (policy.ts) decides, on the model
 * of model.ts, with the thresholds of config.ts; a look's record and log are in look.ts.
 */
import { LINK_FILTER, STATS_FILTER, eventSubject } from '../../shared/bus/subjects.js';
import { subscribeParsed } from '../../shared/bus/bus.js';
import { errorMessage } from '../../shared/model/errors.js';
import { runActor, type ActorContext, type ActorDefinition, type ActorWiring, type RunningService } from '../../shared/actor/shell.js';
import { parseStats, type StageStats } from '../../shared/model/migration.js';
import { parseLinkReport, type LinkReport } from '../../shared/model/link-report.js';
import { startSpan } from '../../shared/telemetry/telemetry.js';
import type { Mode } from '../../shared/model/mode.js';
import { ModeWatcher } from '../../shared/bus/registry.js';
import { PresenceView, setWantedWorkers, workersBucket } from '../../shared/bus/presence.js';
import { CpuSampler } from './cpu.js';
import { bandwidthMoved, bandwidthOf, configOf, firstLookProbe, lookLogFields, newFollowed, secondsBetween, tunedRecord, type Followed } from './look.js';
import { tunerConfig, type TunerConfig } from './config.js';
import type { Conditions, Profile } from './model.js';
import { RatioProbes } from './probes.js';
import { loadProfile } from './profile.js';
import { WorkersWish } from './workers.js';

/** The migrations the tuner follows, and those it ignores (not adaptive), until they end. */
class Following {
  readonly followed = new Map<string, Followed>();
  readonly ignored = new Set<string>();
  readonly wish = new WorkersWish();

  forget(migrationId: string): void {
    this.followed.delete(migrationId);
    this.ignored.delete(migrationId);
    this.wish.forget(migrationId);
  }
}

/** The tuner in the actor shell, deciding with `profile` until it measures better. */
export function tunerActor(profile: Profile, config: Partial<TunerConfig> = {}): ActorDefinition {
  const following = new Following();
  const tuning = tunerConfig(config);
  return {
    name: 'tuner',
    forget: (migrationId) => following.forget(migrationId),
    start: (ctx) => startTuner(ctx, profile, tuning, following),
  };
}

export async function runTunerService(natsUrl: string, profilePath?: string): Promise<RunningService> {
  return runActor(tunerActor(await loadProfile(profilePath)), natsUrl);
}

async function startTuner(ctx: ActorContext, profile: Profile, config: TunerConfig, following: Following): Promise<ActorWiring> {
  const { bus, log, descriptors } = ctx;
  const { followed, ignored, wish } = following;
  const workers = await workersBucket(bus);
  const presence = await PresenceView.start(workers);
  const modes = await ModeWatcher.start(bus.config);
  const cpu = new CpuSampler();
  const probes = new RatioProbes(profile, config, log);
  let spareCores = cpu.sample();
  /** compress workers running (their presence keys, from the view), at the last decision */
  let runningWorkers = 1;

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
    f = newFollowed(profile, config, performance.now());
    followed.set(migrationId, f);
    log.info('following', { migration: migrationId, profile: profile.workload });
    return f;
  };

  /** the wish for compress workers, where it is due (see WorkersWish.due) */
  const writeWish = async (): Promise<void> => {
    const nowMs = performance.now();
    if (!wish.due(nowMs)) return;
    const wanted = wish.wanted;
    await setWantedWorkers(workers, 'compress', wanted);
    wish.wrote(wanted, nowMs);
  };

  /** A look at `f`: the mode, the compress workers to use, the ratio probe; the config and the `tuned` event where they change. */
  const look = (migrationId: string, f: Followed): void => {
    // the look's time; a first look that waits for the ratio probe moves it to when it decides
    let now = performance.now();
    f.lookedAt = { bandwidthBps: bandwidthOf(f), atMs: now };
    void descriptors
      .get(migrationId)
      .then(async (d) => {
        runningWorkers = Math.max(1, presence.live('compress').length || runningWorkers);
        if (f.probe.phase === 'awaited') return; // the look waiting for the ratio probe decides
        const conditionsNow = (): Conditions => ({ bandwidthBps: bandwidthOf(f), spareCores, compressWorkers: runningWorkers });
        const firstLook = f.probe.phase === 'first-look';
        let probeWaitSeconds: number | undefined;
        if (firstLook) {
          const { plan, wait } = firstLookProbe(f.tuner, profile, conditionsNow(), modes.get(migrationId, d.mode));
          if (!wait) probes.putOff(f, plan, now);
          else {
            await probes.startAndWait(migrationId, d, f, plan, now);
            // the look decides now, on what the link and the probe say now: its record says so
            const waitedFromMs = now;
            now = performance.now();
            probeWaitSeconds = secondsBetween(waitedFromMs, now);
          }
        }
        const current: Mode = modes.get(migrationId, d.mode);
        const conditions = conditionsNow();
        const decision = f.tuner.decide(current, conditions, now);
        const mode = decision?.to ?? current;
        const inUse = f.tuner.workersWanted(mode, conditions, f.linkBoundShare);
        probes.startPutOffIfDue(migrationId, d, f, now);
        log.debug('look', { migration: migrationId, ...lookLogFields(f, now, current, conditions) });
        const workersChanged = wish.set(migrationId, inUse);
        const config = configOf(mode, f.tuner.lastLook?.compressFor);
        if (decision || (f.configWritten !== undefined && config !== f.configWritten)) {
          await bus.config.put(migrationId, config);
          f.configWritten = config;
        }
        if (!decision && !workersChanged && !firstLook) return;
        const record = tunedRecord(f, now, current, mode, conditions, decision, inUse, probeWaitSeconds);
        // capture waits for the first one, with its chunks held: published before the log and the wish
        // (its subscription has it a hop later, see firstEvent), after the config its stages follow
        const published = ctx.publishEvent(migrationId, { type: 'tuned', decision: record });
        log.info(decision ? 'switching mode' : 'compress workers in use', { migration: migrationId, ...record });
        startSpan('tuner decision', d.traceparent, { 'handoff.actor': 'tuner', ...Object.fromEntries(Object.entries(record).map(([k, v]) => [`handoff.${k}`, v])) }).end();
        if (workersChanged) await writeWish().catch((err: unknown) => log.debug('wish not written', { reason: errorMessage(err) }));
        await published;
      })
      .catch((err: unknown) => log.warn('decision failed', { migration: migrationId, reason: errorMessage(err) }));
  };

  /** one chunk's statistics */
  const onStats = (s: StageStats, f: Followed): void => {
    f.lastStatsMs = performance.now();
    f.tuner.estimator.observe(s);
  };

  /** the sender's link probe (the first look need not wait for ACKs), or its reading with a chunk's ACK */
  const onLinkReport = (r: LinkReport, f: Followed): void => {
    f.lastStatsMs = performance.now();
    if (r.type === 'probed') {
      f.probedBandwidthBps = r.bandwidthBps;
      if (f.measuredBandwidthBps === 0 && f.probedBandwidthBps > 0) look(r.migrationId, f);
      return;
    }
    if (!r.bandwidthBps) return;
    // the sender counts only the time the link had frames to carry: its figure is the
    // link's rate even while the pipeline is the bottleneck (no guess from the idle share)
    f.measuredBandwidthBps = r.bandwidthBps;
    f.linkBoundShare = r.linkBoundShare;
    if (bandwidthMoved(f, performance.now())) look(r.migrationId, f);
  };

  // The destination has accepted an adaptive migration: the tuner follows it from now (its first
  // look, at the sender's link probe, may probe the ratios in this process: see RatioProbes).
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

  const followedBy =
    <T extends { migrationId: string }>(on: (value: T, f: Followed) => void) =>
    (value: T): void =>
      void follow(value.migrationId).then((f) => {
        if (f) on(value, f);
      });
  const statsSub = subscribeParsed(bus, STATS_FILTER, parseStats, followedBy(onStats));
  const linkSub = subscribeParsed(bus, LINK_FILTER, parseLinkReport, followedBy(onLinkReport));

  /** every half second: the cores, the handoff's own CPU shared out, a look at each migration, the wish */
  const tick = (): void => {
    spareCores = cpu.sample();
    // the handoff's own CPU, shared among the followed migrations by the blocks each sent
    const blocksOut = [...followed.values()].reduce((a, f) => a + f.tuner.estimator.blocksSinceOwnCpu, 0);
    for (const f of followed.values()) f.tuner.estimator.observeOwnCpu(blocksOut > 0 ? (cpu.ownCpuMs * f.tuner.estimator.blocksSinceOwnCpu) / blocksOut : cpu.ownCpuMs / followed.size, f.linkBoundShare);
    const now = performance.now();
    for (const [migrationId, f] of followed) {
      if (now - f.lastStatsMs > config.followIdleMs) {
        followed.delete(migrationId); // finished or abandoned
        continue;
      }
      if (bandwidthOf(f) <= 0) continue; // nothing measured on the link yet
      look(migrationId, f);
    }
    wish.keepOnly(followed);
    writeWish().catch((err: unknown) => log.debug('wish not written', { reason: errorMessage(err) }));
  };
  const timer = setInterval(tick, config.lookEveryMs);

  let resolveDone: () => void = () => undefined;
  const done = new Promise<void>((resolve) => (resolveDone = resolve));
  log.info('ready', { profile: profile.workload, modes: profile.modes.length });
  return {
    done,
    stop: async () => {
      probes.beginStop();
      clearInterval(timer);
      statsSub.unsubscribe();
      linkSub.unsubscribe();
      acceptedSub.unsubscribe();
      // every worker in use again
      await setWantedWorkers(workers, 'compress', undefined).catch(() => undefined);
      modes.stop();
      presence.stop();
      probes.abort(followed.values());
      resolveDone();
    },
  };
}
