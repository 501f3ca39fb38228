/** What a migration did, gathered from the stages' statistics and events; printed as a table or JSON. */
import type { ImageDigests, RebuildResult, RoundRecord, StageStats, TunerDecision } from '../shared/model/migration.js';
import type { LinkReport } from '../shared/model/link-report.js';
import { formatMode } from '../shared/model/mode.js';
import { formatBytes, formatRate } from '../shared/config/units.js';
import type { StreamRoundRecord } from '../services/capture/stream-core.js';

export interface StageSummary {
  chunks: number;
  pages: number;
  bytesIn: number;
  bytesOut: number;
  cpuMs: number;
  wallMs: number;
  instances: number;
  /** chunks each instance (host:pid) handled: how the work was shared */
  perInstance: Record<string, number>;
  counts: Record<string, number>;
}

export interface MigrationSummary {
  migrationId: string;
  verified: boolean;
  reason?: string;
  /** from the command's start (images checked, actors started) to the verified result */
  handoffSeconds: number;
  /** from the destination's acceptance (capture starts) to the verified result: the pipeline's own time */
  transferSeconds: number;
  /** dirty bytes captured */
  inputBytes: number;
  /** bytes on the WAN link */
  wireBytes: number;
  scannedBytes: number;
  dirtyPages: number;
  /** wireBytes * 8 / handoffSeconds */
  effectiveBps: number;
  /** bandwidth measured from the receiver's ACKs, averaged over the transfer */
  measuredBandwidthBps: number;
  modes: string[];
  /** chunks (slices) sent to the wire in each mode */
  chunksByMode: Record<string, number>;
  adaptive: boolean;
  /** the tuner's switches, with what it measured and predicted */
  decisions: TunerDecision[];
  stages: Record<string, StageSummary>;
  sourceHashes?: ImageDigests;
  rebuild?: RebuildResult;
  /** live: the pre-copy rounds and the policy's decisions */
  rounds?: RoundRecord[];
  /** live: from the stop at the source to the guest running at the destination */
  downtimeMs?: number;
  /** live: the source VM at the end (stopped: handed off; resumed: the handoff failed) */
  sourceVm?: 'stopped' | 'resumed' | 'running';
  /** live from QEMU's own migration stream: what QEMU did */
  qemu?: QemuSummary;
}

/** What QEMU did in a stream-mode handoff: its own downtime, and whether auto-converge throttled the guest. */
export interface QemuSummary {
  autoConverge: boolean;
  /** how long QEMU says the VM was stopped at the source (the stop to its last byte sent) */
  downtimeMs?: number;
  /** the most auto-converge throttled the guest's vCPUs (%; 0: not throttled) */
  maxCpuThrottlePct: number;
  /** rounds that ended with the guest throttled */
  throttledRounds: number;
  /** the lowest CPU quota capture put on the source's QEMU (% of a core), where rounds stopped shrinking */
  minCpuQuotaPct?: number;
}

export function qemuSummary(rounds: readonly StreamRoundRecord[], autoConverge: boolean): QemuSummary {
  const downtimeMs = rounds.at(-1)?.qemuDowntimeMs;
  return {
    autoConverge,
    ...(downtimeMs !== undefined ? { downtimeMs } : {}),
    maxCpuThrottlePct: Math.max(0, ...rounds.map((r) => r.cpuThrottlePct ?? 0)),
    throttledRounds: rounds.filter((r) => (r.cpuThrottlePct ?? 0) > 0).length,
    ...(rounds.some((r) => r.cpuQuotaPct !== undefined) ? { minCpuQuotaPct: Math.min(...rounds.map((r) => r.cpuQuotaPct ?? 100)) } : {}),
  };
}

function formatQemu(q: QemuSummary): string {
  const throttle = !q.autoConverge ? 'auto-converge off' : q.maxCpuThrottlePct > 0 ? `auto-converge throttled the guest up to ${q.maxCpuThrottlePct}% (${q.throttledRounds} rounds)` : 'auto-converge on, the guest not throttled';
  const quota = q.minCpuQuotaPct !== undefined ? `; the guest slowed to ${q.minCpuQuotaPct}% of a core (CPU quota)` : '';
  return `QEMU: downtime ${q.downtimeMs !== undefined ? `${q.downtimeMs} ms` : '-'} at the source; ${throttle}${quota}`;
}

export const STAGE_ORDER = ['capture', 'dedup', 'delta', 'compress', 'sender'] as const;

export class StatsCollector {
  readonly stages: Record<string, StageSummary> = {};
  /** chunks (slices) sent to the wire in each mode, in the order the modes first came */
  readonly chunksByMode = new Map<string, number>();
  scannedBytes = 0;
  wireBytes = 0;
  ackedChunks = 0;
  emittedSlices = 0;
  /** the sender's average over the link's life: acknowledged bytes since its first chunk was sent (progress, summary) */
  measuredBandwidthBps = 0;

  add(s: StageStats): void {
    const st = (this.stages[s.stage] ??= { chunks: 0, pages: 0, bytesIn: 0, bytesOut: 0, cpuMs: 0, wallMs: 0, instances: 0, perInstance: {}, counts: {} });
    st.chunks++;
    st.pages += s.pages;
    st.bytesIn += s.bytesIn;
    st.bytesOut += s.bytesOut;
    st.cpuMs += s.cpuMs;
    st.wallMs += s.wallMs;
    st.perInstance[s.instance] = (st.perInstance[s.instance] ?? 0) + 1;
    st.instances = Object.keys(st.perInstance).length;
    for (const [k, v] of Object.entries(s.counts ?? {})) {
      if (k === 'scannedBytes' || k === 'blocks') continue;
      st.counts[k] = (st.counts[k] ?? 0) + v;
    }
    if (s.next === 'wire') {
      const mode = formatMode(s.mode);
      this.chunksByMode.set(mode, (this.chunksByMode.get(mode) ?? 0) + 1);
    }
    if (s.stage === 'capture') {
      this.scannedBytes = Math.max(this.scannedBytes, s.counts?.scannedBytes ?? 0);
      this.emittedSlices += s.counts?.slices ?? 0;
    }
    if (s.stage === 'sender') {
      this.wireBytes += s.bytesOut;
      this.ackedChunks++;
    }
  }

  /** the link's average rate, as the sender reads it with each acknowledged chunk */
  addLinkReport(r: LinkReport): void {
    if (r.type === 'measured' && r.averageBandwidthBps) this.measuredBandwidthBps = r.averageBandwidthBps;
  }
}

function pad(text: string, width: number, right = false): string {
  return right ? text.padStart(width) : text.padEnd(width);
}

export function formatTable(rows: string[][], rightAlignFrom = 1): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return rows.map((r) => r.map((cell, c) => pad(cell, widths[c]!, c >= rightAlignFrom)).join('  ')).join('\n');
}

export function formatSummary(s: MigrationSummary): string {
  const lines: string[] = [];
  lines.push(`migration ${s.migrationId}: ${s.verified ? 'VERIFIED (images byte-identical)' : `FAILED: ${s.reason ?? 'unknown'}`}`);
  lines.push(
    `handoff ${s.handoffSeconds.toFixed(2)} s (transfer ${s.transferSeconds.toFixed(2)} s), dirty input ${formatBytes(s.inputBytes)} (${s.dirtyPages} pages of ${formatBytes(s.scannedBytes)} scanned), ` +
      `wire ${formatBytes(s.wireBytes)} (${s.inputBytes ? ((100 * s.wireBytes) / s.inputBytes).toFixed(1) : '0'}% of input), ` +
      `measured bandwidth ${formatRate(s.measuredBandwidthBps)}`,
  );
  if (s.rounds) {
    lines.push(`live: ${s.rounds.length} rounds, downtime ${s.downtimeMs !== undefined ? `${s.downtimeMs} ms` : '-'}, source VM ${s.sourceVm ?? '?'}`);
    if (s.qemu) lines.push(formatQemu(s.qemu));
    for (const r of s.rounds as StreamRoundRecord[]) {
      const throttled = (r.cpuThrottlePct ? ` (guest throttled ${r.cpuThrottlePct}%)` : '') + (r.cpuQuotaPct !== undefined ? ` (CPU quota ${r.cpuQuotaPct}%)` : '');
      lines.push(`  round ${r.round}: ${r.dirtyPages} dirty pages in ${r.seconds.toFixed(2)} s; ${r.decision}${throttled}`);
    }
  }
  const switches = s.decisions.filter((d) => d.from !== d.to).length;
  lines.push(`modes: ${s.modes.map((m) => (s.modes.length > 1 ? `${m} (${s.chunksByMode[m] ?? 0} chunks)` : m)).join(', ') || 'none'}${s.adaptive ? ` (adaptive, ${switches} switches)` : ''}`);
  for (const d of s.decisions) {
    const workers = `${d.compressWorkersInUse ?? d.compressWorkers} of ${d.compressWorkers} compress workers in use`;
    const waited = d.probeWaitSeconds !== undefined ? `, after waiting ${d.probeWaitSeconds.toFixed(2)} s for the ratio probe` : '';
    lines.push(
      (d.from === d.to
        ? `  at ${d.atSeconds.toFixed(1)} s: ${d.to} stays, ${workers} (bandwidth ${formatRate(d.bandwidthBps)} assumed, ${d.spareCores} spare cores)`
        : `  at ${d.atSeconds.toFixed(1)} s: ${d.from} -> ${d.to} (bandwidth ${d.measuredBandwidthBps > 0 ? `${formatRate(d.measuredBandwidthBps)} measured` : `${formatRate(d.probedBandwidthBps ?? 0)} probed`}, ${formatRate(d.bandwidthBps)} assumed, ${d.spareCores} spare cores, ${workers}; predicted ${d.predictedCurrentBlocksPerSec} -> ${d.predictedChosenBlocksPerSec} blocks/s)`) + waited,
    );
  }
  const rows = [['stage', 'instances', 'chunks', 'in', 'out', 'out/in', 'cpu s', 'MB/s per cpu', 'details']];
  for (const name of STAGE_ORDER) {
    const st = s.stages[name];
    if (!st) continue;
    // counts are whole, but for CPU ms (a codec's, summed over chunks): whole ms say enough there
    const details = Object.entries(st.counts)
      .map(([k, v]) => `${k}=${Math.round(v)}`)
      .join(' ');
    rows.push([
      name,
      // how the work was shared, when several instances did it
      st.instances > 1 ? `${st.instances} (${Object.values(st.perInstance).join('/')} chunks)` : String(st.instances),
      String(st.chunks),
      formatBytes(st.bytesIn),
      formatBytes(st.bytesOut),
      st.bytesIn ? (st.bytesOut / st.bytesIn).toFixed(3) : '-',
      (st.cpuMs / 1000).toFixed(2),
      st.cpuMs > 0 ? (st.bytesIn / 1e6 / (st.cpuMs / 1000)).toFixed(0) : '-',
      details,
    ]);
  }
  lines.push(formatTable(rows));
  if (s.rebuild) {
    lines.push(`destination: ${s.rebuild.pagesWritten} pages written from ${s.rebuild.slices} chunk slices (${s.rebuild.duplicateSlices} duplicates ignored) in ${s.rebuild.rebuildSeconds.toFixed(2)} s`);
  }
  return lines.join('\n');
}
