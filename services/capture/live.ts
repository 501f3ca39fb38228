/**
 * Live capture of a running VM (iterative pre-copy): round 0 sends what differs from the base, each
 * later round what changed since the round before, until the round policy says stop; then the VM
 * is stopped over QMP, its device state saved (RAM is skipped: it is the shared file capture reads)
 * and the last round captured. If anything fails once the VM is stopped, it is resumed here.
 */
import { open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { publishEvent, waitMigrationBacklog, type Bus } from '../../shared/bus/bus.js';
import { EndedMigrationError } from '../../shared/bus/registry.js';
import { encodePatch } from '../../shared/codecs/patch.js';
import { errorMessage } from '../../shared/model/errors.js';
import type { Logger } from '../../shared/telemetry/log.js';
import type { MigrationDescriptor, RoundRecord } from '../../shared/model/migration.js';
import { PAGE_SIZE } from '../../shared/image/pages.js';
import { QmpClient } from '../../shared/vm/qmp.js';
import { saveDeviceState } from '../../shared/vm/qemu.js';
import { newPageRecord } from './core.js';
import { mapImage } from './mapping.js';
import { decideAfterRound, type RoundStat } from './policy.js';
import { captureRound, type CaptureGate, type LiveImages, type PublishStats } from './round.js';

/** What the stop costs besides the last round's pages: device state, the final scan, the resume. */
const STOP_OVERHEAD_MS = 150;

/** Waits until none of this migration's messages is left in the work streams: the round has arrived. */
export async function waitDelivered(bus: Bus, d: MigrationDescriptor): Promise<void> {
  // a migration that failed meanwhile (its descriptor is gone) ends pre-copy: the VM runs on
  await waitMigrationBacklog(bus, d.migrationId, 1).catch((err: unknown) => {
    throw err instanceof EndedMigrationError ? new Error(`the migration ended during pre-copy (${errorMessage(err)})`) : err;
  });
}

/** `gate`: round 0's, see captureRound; `report`: each round's per-chunk statistics */
export async function captureLive(bus: Bus, d: MigrationDescriptor, log: Logger, gate: CaptureGate | undefined, report: PublishStats): Promise<void> {
  const live = d.live!;
  const images: LiveImages = {
    records: [newPageRecord(d.memory.bytes / PAGE_SIZE), newPageRecord(d.disk.bytes / PAGE_SIZE)],
    views: [await mapImage(d.memory.current, d.memory.bytes, log), await mapImage(d.disk.current, d.disk.bytes, log)],
  };
  const history: RoundStat[] = [];
  const rounds: RoundRecord[] = [];
  for (let round = 0; ; round++) {
    const decision = round === 0 ? undefined : decideAfterRound(history, { downtimeMs: live.downtimeMs, maxRounds: live.maxRounds, overheadMs: STOP_OVERHEAD_MS });
    if (decision) rounds.at(-1)!.decision = decision.reason;
    if (decision) rounds.at(-1)!.predictedDowntimeMs = Math.round(decision.predictedDowntimeMs);
    if (decision?.final) {
      await stopAndCopy(bus, d, round, images, rounds, log, report);
      return;
    }
    const r = await captureRound(bus, d, round, log, images, round === 0 ? gate : undefined, report);
    await publishEvent(bus, d.migrationId, { type: 'captured', round, slices: r.slices, imageHashes: r.imageHashes, dirtyPages: r.dirtyPages, scannedBytes: r.scannedBytes, final: false });
    const started = performance.now() - r.seconds * 1000;
    await waitDelivered(bus, d);
    const seconds = (performance.now() - started) / 1000;
    history.push({ round, dirtyPages: r.dirtyPages, seconds });
    rounds.push({ round, dirtyPages: r.dirtyPages, seconds: Number(seconds.toFixed(3)), decision: '' });
    log.info('pre-copy round delivered', { round, dirtyPages: r.dirtyPages, seconds: Number(seconds.toFixed(2)) });
  }
}

async function flushFile(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

async function stopAndCopy(bus: Bus, d: MigrationDescriptor, round: number, images: LiveImages, rounds: RoundRecord[], log: Logger, report: PublishStats): Promise<void> {
  const live = d.live!;
  const qmp = await QmpClient.connect(live.qmpSocket, 10_000);
  const stateFile = join(tmpdir(), `handoff-devstate-${d.migrationId}-${process.pid}`);
  // read while the VM still runs: what the stop waits for is downtime
  const baseState = await readFile(live.baseDeviceState);
  // QEMU flushes the guest's disk when it stops: written back now, that flush finds little to do
  await flushFile(d.disk.current);
  const stoppedAtMs = Date.now();
  await qmp.execute('stop');
  const stopMs = Date.now() - stoppedAtMs;
  log.info('VM stopped: stop-and-copy', { round, stopMs });
  try {
    // RAM is frozen once the VM stops and the device state excludes it: both at once
    const since = (t0: number) => () => Date.now() - t0;
    const t0 = Date.now();
    const [deviceStateMs, r] = await Promise.all([saveDeviceState(qmp, stateFile).then(since(t0)), captureRound(bus, d, round, log, images, undefined, report)]);
    const state = await readFile(stateFile);
    // level 3: the long matches against the base are found all the same, in milliseconds (downtime)
    const deviceState = encodePatch(state, baseState, 3).toString('base64');
    rounds.push({ round, dirtyPages: r.dirtyPages, seconds: Number(r.seconds.toFixed(3)), decision: 'stop-and-copy' });
    await publishEvent(bus, d.migrationId, {
      type: 'captured',
      round,
      slices: r.slices,
      imageHashes: r.imageHashes,
      dirtyPages: r.dirtyPages,
      scannedBytes: r.scannedBytes,
      final: true,
      deviceState,
      stoppedAtMs,
      rounds,
    });
    log.info('final round captured', { round, dirtyPages: r.dirtyPages, deviceStateBytes: state.byteLength, encodedBytes: Math.round((deviceState.length * 3) / 4), deviceStateMs, scanMs: Math.round(r.seconds * 1000), sinceStopMs: Date.now() - stoppedAtMs });
  } catch (err) {
    // nothing reached the destination that it could resume: the source runs again
    log.error('stop-and-copy failed: resuming the source VM', { reason: errorMessage(err) });
    await qmp.execute('cont').catch(() => undefined);
    throw new Error(`stop-and-copy failed (the source VM runs again): ${errorMessage(err)}`);
  } finally {
    qmp.close();
    await rm(stateFile, { force: true });
  }
}
