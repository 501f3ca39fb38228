/**
 * When and where the tuner runs a migration's ratio probe: in its own process beside the pipeline's
 * head start, in a process of its own at the tuner's priority or the lowest, or put off to a later
 * look; and its ratios into the migration's tuner once in.
 */
import { setTimeout as delay } from 'node:timers/promises';
import type { MigrationDescriptor } from '../../shared/model/migration.js';
import { errorMessage } from '../../shared/model/errors.js';
import { formatMode, type Mode } from '../../shared/model/mode.js';
import type { Logger } from '../../shared/telemetry/log.js';
import type { TunerConfig } from './config.js';
import { putOffProbeStarts } from './policy.js';
import type { Followed } from './look.js';
import { pick, type Profile } from './model.js';
import { probeRatios, type ProbeImages, type ProbePlan, type ProbeResult } from './probe.js';
import type { ProbeRun } from './probe-state.js';
import { PROBE_NICE, runProbeProcess } from './probe-process.js';

function imagesOf(d: MigrationDescriptor): ProbeImages {
  return { memory: d.memory, disk: d.disk, chunkPages: d.chunkPages };
}

export class RatioProbes {
  /** stops the probes in processes of their own when the tuner stops */
  private readonly running = new AbortController();
  private stopping = false;

  constructor(
    private readonly profile: Profile,
    private readonly config: TunerConfig,
    private readonly log: Logger,
  ) {}

  /** the probe of `plan`, put off: the first look is done without it */
  putOff(f: Followed, plan: ProbePlan, nowMs: number): void {
    f.probe = { phase: 'put-off', plan, dueMs: nowMs + this.config.laterProbeAfterMs };
  }

  /**
   * The first look's probe of `plan`, which the look waits for (`probeWaitMs` at most): in this
   * process where the look comes soon after the accept, else in a process of its own at the
   * tuner's priority.
   */
  async startAndWait(migrationId: string, d: MigrationDescriptor, f: Followed, plan: ProbePlan, nowMs: number): Promise<void> {
    if (this.noImages(migrationId, d, f)) return;
    const run = f.acceptedAtMs !== undefined && nowMs - f.acceptedAtMs < this.config.probeHereWithinMs ? this.here(migrationId, d, f, plan) : this.inProcess(migrationId, d, f, plan, 0);
    f.probe = { phase: 'awaited', run };
    // the wait's timer goes with the race: a probe in before it would leave it holding the process
    const waited = new AbortController();
    await Promise.race([run.done, delay(this.config.probeWaitMs, undefined, { signal: waited.signal }).catch(() => undefined)]);
    waited.abort();
    if (f.probe.phase === 'awaited' && f.probe.run === run) f.probe = { phase: 'running', run };
  }

  /** the probe put off, at the lowest priority, where the look at `nowMs` finds its time come (see putOffProbeStarts) */
  startPutOffIfDue(migrationId: string, d: MigrationDescriptor, f: Followed, nowMs: number): void {
    const probe = f.probe;
    if (probe.phase !== 'put-off' || !putOffProbeStarts(probe.dueMs, nowMs, pick(f.tuner.lastLook?.top ?? [], this.config), f.linkBoundShare, this.config)) return;
    if (this.noImages(migrationId, d, f)) return;
    f.probe = { phase: 'running', run: this.inProcess(migrationId, d, f, probe.plan, PROBE_NICE) };
  }

  /** the probe in a process of its own, at `nice` */
  private inProcess(migrationId: string, d: MigrationDescriptor, f: Followed, plan: ProbePlan, nice: number): ProbeRun {
    const run: ProbeRun = { done: Promise.resolve() };
    run.done = this.use(migrationId, f, run, `process at nice ${nice}`, async () => (await runProbeProcess({ images: imagesOf(d), plan }, nice, this.running.signal)).probe);
    return run;
  }

  /**
   * The probe of `plan`'s modes in this process, yielding between modes (a process of its own takes
   * longer to start and load its modules than the probe's own work).
   */
  private here(migrationId: string, d: MigrationDescriptor, f: Followed, plan: ProbePlan): ProbeRun {
    const here = new AbortController();
    const run: ProbeRun = { done: Promise.resolve(), here };
    run.done = this.use(migrationId, f, run, 'here', () => probeRatios(imagesOf(d), plan, { shareWith: here.signal }), here.signal);
    return run;
  }

  /** from now a failed probe is the tuner stopping, not worth a warning */
  beginStop(): void {
    this.stopping = true;
  }

  /** A migration whose RAM comes from QEMU's stream has no memory image to sample: the profile's ratios stand. */
  private noImages(migrationId: string, d: MigrationDescriptor, f: Followed): boolean {
    if (d.memory.current) return false;
    f.probe = { phase: 'over' };
    this.log.info("no memory image to sample (the RAM comes from QEMU's stream): profile ratios kept", { migration: migrationId });
    return true;
  }

  /** stops every probe still running, in processes of their own and in this one */
  abort(followed: Iterable<Followed>): void {
    this.running.abort();
    for (const f of followed) if (f.probe.phase === 'awaited' || f.probe.phase === 'running') f.probe.run.here?.abort();
  }

  /**
   * Every mode's ratio on the migration's own pages, into its tuner: `probeOnce` runs the probe
   * (`where` says where, for the log); a probe `stopped` has nothing to say. Once settled, the
   * migration's probe is over.
   */
  private use(migrationId: string, f: Followed, run: ProbeRun, where: string, probeOnce: () => Promise<ProbeResult | undefined>, stopped?: AbortSignal): Promise<void> {
    const { log, profile } = this;
    const startedMs = performance.now();
    const estimator = f.tuner.estimator;
    return probeOnce()
      .then((probe) => {
        if (stopped?.aborted) return; // the tuner is stopping
        if (!probe) {
          log.info('ratio probe found too few changed pages, profile ratios kept', { migration: migrationId });
          return;
        }
        estimator.useProbedRatios(probe.ratios);
        const shown = (mode: Mode): string => `${formatMode(mode)} ${(estimator.ratioBasisOf(mode) ?? 0).toFixed(3)}`;
        log.info('ratios probed', {
          migration: migrationId,
          where,
          blocks: probe.blocks,
          pagesRead: probe.pagesRead,
          cpuMs: Math.round(probe.cpuMs),
          wallMs: Math.round(performance.now() - startedMs),
          modes: probe.ratios.size,
          smallest: shown([...profile.modes].sort((a, b) => (estimator.ratioBasisOf(a.mode) ?? 1) - (estimator.ratioBasisOf(b.mode) ?? 1))[0]!.mode),
        });
        log.debug('probed ratios', { migration: migrationId, ratios: profile.modes.map((m) => shown(m.mode)).join(', ') });
      })
      .catch((err: unknown) => {
        if (!this.stopping) log.warn('ratio probe failed, profile ratios kept', { migration: migrationId, reason: errorMessage(err) });
      })
      .finally(() => {
        if ((f.probe.phase === 'awaited' || f.probe.phase === 'running') && f.probe.run === run) f.probe = { phase: 'over' };
      });
  }
}
