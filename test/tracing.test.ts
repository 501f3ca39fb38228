/**
 * One migration, one trace: every actor at both ends exports its spans over OTLP/HTTP (to a
 * receiver in this test process), all with the migration's trace id, each parented where it should be.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { migrate } from '../cli/migrate.js';
import { spawnReceiverProcess } from '../cli/receive.js';
import { startTelemetry } from '../shared/telemetry/telemetry.js';
import { makeWorkspace, migrateOptions, type Workspace } from './helpers/cloudlets.js';
import { startOtlpReceiver, type ExportedSpan, type OtlpReceiver } from './helpers/otlp-receiver.js';


describe('tracing', { timeout: 120_000 }, () => {
  let ws: Workspace;
  let otlp: OtlpReceiver;
  before(async () => {
    ws = await makeWorkspace(8 << 20, 8 << 20, 51);
    otlp = await startOtlpReceiver();
    // the standard variables, inherited by every actor process and the destination
    Object.assign(process.env, { OTEL_EXPORTER_OTLP_ENDPOINT: otlp.url, OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json', OTEL_BSP_SCHEDULE_DELAY: '200' });
  });
  after(async () => {
    otlp.server.close();
    await ws.cleanup();
  });

  test('a migration is one trace with spans from every actor at both ends, parents right', async () => {
    const telemetry = await startTelemetry('control');
    assert.equal(telemetry.tracing, true);
    const receiver = await spawnReceiverProcess({ baseMemory: ws.destBaseMemory, baseDisk: ws.destBaseDisk, outDir: join(ws.dir, 'destination', 'traced') });
    const summary = await migrate(migrateOptions(ws, receiver.address, { mode: { delta: 'xor', compressor: 'zstd', level: 3 } }));
    assert.equal(summary.verified, true, summary.reason);
    // actors flush their spans when they stop (migrate stopped them); the receiver when it exits
    await receiver.exited;
    await telemetry.shutdown();
    const spans = otlp.spans;

    const roots = spans.filter((s) => !s.parentSpanId);
    assert.deepEqual(roots.map((s) => s.name), ['handoff'], 'exactly one root span, the migration');
    assert.deepEqual(new Set(spans.map((s) => s.traceId)), new Set([roots[0]!.traceId]), 'spans in another trace');

    const services = new Set(spans.map((s) => s.service));
    for (const actor of ['control', 'capture', 'dedup', 'delta', 'compress', 'sender', 'receiver']) assert.ok(services.has(`handoff-${actor}`), `no spans from ${actor}: ${[...services].join(', ')}`);

    const byId = new Map(spans.map((s) => [s.spanId, s]));
    for (const s of spans) if (s.parentSpanId) assert.ok(byId.has(s.parentSpanId), `${s.name} (${s.service}) has a parent that was never exported`);
    const parentName = (s: ExportedSpan): string => byId.get(s.parentSpanId)?.name ?? '';
    const expectParent: Record<string, string[]> = {
      capture: ['handoff'],
      'wan link': ['handoff'],
      'capture chunk': ['capture'],
      'dedup chunk': ['capture chunk'],
      'delta chunk': ['dedup chunk'],
      // a chunk dedup turned into references only skips delta and compress
      'compress chunk': ['delta chunk', 'dedup chunk'],
      'send chunk': ['compress chunk', 'delta chunk', 'dedup chunk'],
      receive: ['wan link'],
      'apply chunk': ['receive'],
    };
    for (const [name, parents] of Object.entries(expectParent)) {
      const found = spans.filter((s) => s.name === name);
      assert.ok(found.length > 0, `no ${name} span`);
      for (const s of found) assert.ok(parents.includes(parentName(s)), `${name} under ${parentName(s)}, expected ${parents.join(' or ')}`);
    }
    // the destination's spans came across the WAN link
    assert.ok(spans.filter((s) => s.service === 'handoff-receiver' && s.name === 'apply chunk').length >= 2);
  });
});
