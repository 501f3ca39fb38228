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
import { putOffProbeStarts } from './core.js';
import type { Followed } from './look.js';
import { pick, type Profile } from './model.js';
import { probeRatios, type ProbeImages, type ProbePlan, type ProbeResult } from './probe.js';
import { PROBE_NICE, runProbeProcess } from './probe-process.js';

/**
 * The longest the first look waits for the ratio probe: longer than a probe in the tuner's process
 * takes beside the pipeline's head start, and about what one in a process of its own takes beside a
 * running pipeline. Past that, the look decides on the profile's ratios, and later looks use the probe's.
 */
const PROBE_WAIT_MS = 2000;

/**
 * A probe put off (the cores are the bottleneck, or the start mode is near the best) starts at the
 * first look at least this long after the first look that finds the link the bottleneck
 * (putOffProbeStarts): ratios matter only then, and the probe's process takes CPU from cores that
 * are short. Started at once instead, it ran through the phases where the cores were short.
 */
const LATER_PROBE_AFTER_MS = 3000;

/** a first look this soon after the accept probes in the tuner's process (the pipeline has its head start only) */
const PROBE_HERE_WITHIN_MS = 2000;

function imagesOf(d: MigrationDescriptor): ProbeImages {
  return { memory: d.memory, disk: d.disk, chunkPages: d.chunkPages };
}

export class RatioProbes {
  /** stops the probes in processes of their own when the tuner stops */
  private readonly running = new AbortController();
  private stopping = false;

  constructor(
    private readonly profile: Profile,
    private readonly log: Logger,
  ) {}

  /** the probe of `plan`, put off (see LATER_PROBE_AFTER_MS): the first look is done without it */
  putOff(f: Followed, plan: ProbePlan, nowMs: number): void {
    f.probe = Promise.resolve();
    f.laterProbe = { plan, dueMs: nowMs + LATER_PROBE_AFTER_MS };
  }

  /**
   * The first look's probe of `plan`, which the look waits for (PROBE_WAIT_MS at most; other looks
   * skip meanwhile): in this process where the look comes soon after the accept, else in a process
   * of its own at the tuner's priority.
   */
  async startAndWait(migrationId: string, d: MigrationDescriptor, f: Followed, plan: ProbePlan, nowMs: number): Promise<void> {
    if (this.noImages(migrationId, d, f)) return;
    if (f.acceptedAtMs !== undefined && nowMs - f.acceptedAtMs < PROBE_HERE_WITHIN_MS) this.here(migrationId, d, f, plan);
    else f.probe = this.inProcess(migrationId, d, f, plan, 0);
    f.probeAwaiting = true;
    await Promise.race([f.probe, delay(PROBE_WAIT_MS)]).finally(() => (f.probeAwaiting = false));
  }

  /** the probe put off, at the lowest priority, where the look at `nowMs` finds its time come (see putOffProbeStarts) */
  startPutOffIfDue(migrationId: string, d: MigrationDescriptor, f: Followed, nowMs: number): void {
    if (f.laterProbe && putOffProbeStarts(f.laterProbe.dueMs, nowMs, pick(f.tuner.lastLook?.top ?? []), f.linkBoundShare)) {
      if (this.noImages(migrationId, d, f)) return;
      f.probe = this.inProcess(migrationId, d, f, f.laterProbe.plan, PROBE_NICE);
      f.laterProbe = undefined;
    }
  }

  /** the probe in a process of its own, at `nice` */
  private inProcess(migrationId: string, d: MigrationDescriptor, f: Followed, plan: ProbePlan, nice: number): Promise<void> {
    return this.use(migrationId, f, `process at nice ${nice}`, async () => (await runProbeProcess({ images: imagesOf(d), plan }, nice, this.running.signal)).probe);
  }

  /**
   * The probe of `plan`'s modes in this process, yielding between modes (a process of its own takes
   * longer to start and load its modules than the probe's own work).
   */
  private here(migrationId: string, d: MigrationDescriptor, f: Followed, plan: ProbePlan): void {
    const here = (f.probeHere = new AbortController());
    f.probe = this.use(migrationId, f, 'here', () => probeRatios(imagesOf(d), plan, { shareWith: here.signal }), here.signal).finally(() => {
      if (f.probeHere === here) f.probeHere = undefined;
    });
  }

  /** from now a failed probe is the tuner stopping, not worth a warning */
  beginStop(): void {
    this.stopping = true;
  }

  /** A migration whose RAM comes from QEMU's stream has no memory image to sample: the profile's ratios stand. */
  private noImages(migrationId: string, d: MigrationDescriptor, f: Followed): boolean {
    if (d.memory.current) return false;
    f.probe = Promise.resolve();
    f.laterProbe = undefined;
    this.log.info("no memory image to sample (the RAM comes from QEMU's stream): profile ratios kept", { migration: migrationId });
    return true;
  }

  /** stops every probe still running, in processes of their own and in this one */
  abort(followed: Iterable<Followed>): void {
    this.running.abort();
    for (const f of followed) f.probeHere?.abort();
  }

  /**
   * Every mode's ratio on the migration's own pages, into its tuner: `run` runs the probe (`where`
   * says where, for the log); a probe `stopped` has nothing to say
   */
  private use(migrationId: string, f: Followed, where: string, run: () => Promise<ProbeResult | undefined>, stopped?: AbortSignal): Promise<void> {
    const { log, profile } = this;
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
        if (!this.stopping) log.warn('ratio probe failed, profile ratios kept', { migration: migrationId, reason: errorMessage(err) });
      });
  }
}
