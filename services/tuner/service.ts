/**
 * Tuner actor: follows the statistics of adaptive migrations, re-decides every half second (so a
 * bandwidth change is acted on within a second or two), and writes the chosen mode to the config
 * bucket, where every stage picks it up from its next chunk.
 */
import { hostname } from 'node:os';
import { connectBus, publishEvent } from '../../shared/bus.js';
import { errorMessage } from '../../shared/errors.js';
import type { RunningService } from '../../shared/stage.js';
import { createLogger } from '../../shared/log.js';
import { parseStats, type StageStats, type TunerDecision } from '../../shared/migration.js';
import { startSpan } from '../../shared/telemetry.js';
import { formatMode, type Mode } from '../../shared/mode.js';
import { DescriptorCache, ModeWatcher } from '../../shared/registry.js';
import { CpuSampler } from './cpu.js';
import { Tuner } from './core.js';
import { loadProfile } from './profile.js';

const DECIDE_EVERY_MS = 500;
/** a compress worker counts as running while it reported within this window */
const WORKER_SEEN_MS = 3000;

interface Followed {
  tuner: Tuner;
  startedMs: number;
  bandwidthBps: number;
  measuredBandwidthBps: number;
  workers: Map<string, number>;
  lastStatsMs: number;
}

export async function runTunerService(natsUrl: string, profilePath?: string): Promise<RunningService> {
  const log = createLogger({ stage: 'tuner', instance: `${hostname()}:${process.pid}` });
  const profile = await loadProfile(profilePath);
  const bus = await connectBus(natsUrl, 'handoff-tuner');
  const followed = new Map<string, Followed>();
  const ignored = new Set<string>();
  const descriptors = await DescriptorCache.following(bus.migrations, (migrationId) => {
    followed.delete(migrationId);
    ignored.delete(migrationId);
  });
  const modes = await ModeWatcher.start(bus.config);
  const cpu = new CpuSampler();
  let spareCores = cpu.sample();

  const follow = async (migrationId: string): Promise<Followed | undefined> => {
    if (ignored.has(migrationId)) return undefined;
    let f = followed.get(migrationId);
    if (f) return f;
    const d = await descriptors.get(migrationId).catch(() => undefined);
    if (!d?.adaptive) {
      ignored.add(migrationId);
      return undefined;
    }
    f = { tuner: new Tuner(profile), startedMs: performance.now(), bandwidthBps: 0, measuredBandwidthBps: 0, workers: new Map(), lastStatsMs: performance.now() };
    followed.set(migrationId, f);
    log.info('following', { migration: migrationId, profile: profile.workload });
    return f;
  };

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
        f.tuner.observe(s);
        if (s.stage === 'sender' && s.counts?.bandwidthBps) {
          // ACKs measure the link only while it is the bottleneck; otherwise the link can carry
          // more (up to 2x is assumed, no more: an overestimate switches to modes the link then
          // cannot carry), so less compression is not ruled out
          const linkBound = Math.max(0.5, (s.counts.linkBoundPct ?? 100) / 100);
          f.bandwidthBps = s.counts.bandwidthBps / linkBound;
          f.measuredBandwidthBps = s.counts.bandwidthBps;
        }
        if (s.stage === 'compress') f.workers.set(s.instance, performance.now());
      });
    },
  });

  const timer = setInterval(() => {
    spareCores = cpu.sample();
    const now = performance.now();
    for (const [migrationId, f] of followed) {
      if (now - f.lastStatsMs > 60_000) {
        followed.delete(migrationId); // finished or abandoned
        continue;
      }
      if (f.bandwidthBps <= 0) continue; // nothing measured on the link yet
      for (const [w, seen] of f.workers) if (now - seen > WORKER_SEEN_MS) f.workers.delete(w);
      void descriptors
        .get(migrationId)
        .then(async (d) => {
          const current: Mode = modes.get(migrationId, d.mode);
          const conditions = { bandwidthBps: f.bandwidthBps, spareCores, compressWorkers: Math.max(1, f.workers.size) };
          const decision = f.tuner.decide(current, conditions, now);
          if (!decision) return;
          const record: TunerDecision = {
            atSeconds: Number(((now - f.startedMs) / 1000).toFixed(2)),
            from: formatMode(decision.from),
            to: formatMode(decision.to),
            bandwidthBps: Math.round(conditions.bandwidthBps),
            measuredBandwidthBps: Math.round(f.measuredBandwidthBps),
            spareCores: Number(conditions.spareCores.toFixed(2)),
            compressWorkers: conditions.compressWorkers,
            predictedCurrentBlocksPerSec: Math.round(decision.currentBlocksPerSec),
            predictedChosenBlocksPerSec: Math.round(decision.chosenBlocksPerSec),
          };
          log.info('switching mode', { migration: migrationId, ...record });
          startSpan('tuner decision', d.traceparent, { 'handoff.actor': 'tuner', ...Object.fromEntries(Object.entries(record).map(([k, v]) => [`handoff.${k}`, v])) }).end();
          await bus.config.put(migrationId, JSON.stringify(decision.to));
          await publishEvent(bus, migrationId, { type: 'tuned', decision: record });
        })
        .catch((err: unknown) => log.warn('decision failed', { migration: migrationId, reason: errorMessage(err) }));
    }
  }, DECIDE_EVERY_MS);

  let resolveDone: () => void = () => undefined;
  const done = new Promise<void>((resolve) => (resolveDone = resolve));
  log.info('ready', { profile: profile.workload, modes: profile.modes.length });
  return {
    ready: () => bus.connected(),
    done,
    stop: async () => {
      clearInterval(timer);
      sub.unsubscribe();
      modes.stop();
      descriptors.stop();
      await bus.close();
      resolveDone();
    },
  };
}
