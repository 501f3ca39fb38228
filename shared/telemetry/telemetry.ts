/**
 * Tracing and metrics. One trace per migration, rooted at the source's control path; its context
 * travels in the migration's descriptor, in NATS message headers (W3C `traceparent`) and in the WAN
 * link's handshake, so every actor's spans at both ends join it. Exported over OTLP when the standard
 * OTEL_* variables ask for it (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL,
 * OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER ...); without them the API is a no-op and costs nothing.
 * Metrics are kept where something reads them: the Prometheus text a health server serves at /metrics.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { context, metrics, propagation, trace, type Attributes, type Context, type Span } from '@opentelemetry/api';
import { headers as natsHeaders, type MsgHdrs } from '@nats-io/transport-node';
import type { StageStats } from '../model/migration.js';
import type { LinkReport } from '../model/link-report.js';

export interface Telemetry {
  tracing: boolean;
  /** Prometheus text of this process's metrics */
  serveMetrics(req: IncomingMessage, res: ServerResponse): void;
  /** flushes spans still batched, then stops */
  shutdown(): Promise<void>;
}

let running: Telemetry | undefined;

/** Tracing is on when the environment names an exporter or an endpoint (the OTel convention). */
export function tracingConfigured(env: NodeJS.ProcessEnv = process.env): boolean {
  const exporter = env.OTEL_TRACES_EXPORTER;
  if (exporter) return exporter !== 'none';
  return Boolean(env.OTEL_EXPORTER_OTLP_ENDPOINT || env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT);
}

/**
 * Starts telemetry for this process, once; `actor` names the service unless OTEL_SERVICE_NAME does.
 * The SDKs cost CPU to load in every actor process, and a command that spawns its actors starts
 * seven on the source's cores before a handoff can begin: the tracing SDK is loaded only when
 * tracing is configured, the metrics SDK only where `metrics` (a health server will serve them) or
 * tracing asks for it.
 */
export async function startTelemetry(actor: string, options: { metrics: boolean } = { metrics: true }): Promise<Telemetry> {
  if (running) return running;
  const tracing = tracingConfigured();
  if (!tracing && !options.metrics) {
    running = {
      tracing,
      serveMetrics: (_req, res) => void res.writeHead(404).end('metrics are not kept in this process\n'),
      shutdown: async () => void (running = undefined),
    };
    return running;
  }
  const [{ PrometheusExporter }, { resourceFromAttributes }, { MeterProvider }] = await Promise.all([
    import('@opentelemetry/exporter-prometheus'),
    import('@opentelemetry/resources'),
    import('@opentelemetry/sdk-metrics'),
  ]);
  const prometheus = new PrometheusExporter({ preventServerStart: true });
  let shutdown: () => Promise<void>;
  if (tracing) {
    const { NodeSDK } = await import('@opentelemetry/sdk-node');
    const sdk = new NodeSDK({
      ...(process.env.OTEL_SERVICE_NAME ? {} : { serviceName: `handoff-${actor}` }),
      metricReader: prometheus,
      instrumentations: [],
    });
    sdk.start();
    shutdown = () => sdk.shutdown();
  } else {
    const provider = new MeterProvider({ readers: [prometheus], resource: resourceFromAttributes({ 'service.name': process.env.OTEL_SERVICE_NAME ?? `handoff-${actor}` }) });
    metrics.setGlobalMeterProvider(provider);
    shutdown = () => provider.shutdown();
  }
  running = {
    tracing,
    serveMetrics: (req, res) => prometheus.getMetricsRequestHandler(req, res),
    shutdown: async () => {
      running = undefined;
      await shutdown().catch(() => undefined);
    },
  };
  return running;
}

export const tracer = (): ReturnType<typeof trace.getTracer> => trace.getTracer('cloudlet-handoff');

/** The context a W3C traceparent names (the root context when there is none). */
export function contextFrom(traceparent: string | undefined): Context {
  if (!traceparent) return context.active();
  return propagation.extract(context.active(), { traceparent });
}

/** The W3C traceparent of a span, to carry it where headers cannot go (descriptor, handshake). */
export function traceparentOf(span: Span): string | undefined {
  const carrier: Record<string, string> = {};
  propagation.inject(trace.setSpan(context.active(), span), carrier);
  return carrier.traceparent;
}

/** Starts a span under the context `traceparent` names. */
export function startSpan(name: string, traceparent: string | undefined, attributes: Attributes = {}): Span {
  return tracer().startSpan(name, { attributes }, contextFrom(traceparent));
}

/** NATS headers carrying a span's context (undefined when tracing is off: no headers at all). */
export function headersFor(traceparent: string | undefined): MsgHdrs | undefined {
  if (!traceparent) return undefined;
  const h = natsHeaders();
  h.set('traceparent', traceparent);
  return h;
}

/** The traceparent a message carries (NATS header names are case-sensitive: the W3C name exactly). */
export function traceparentFrom(h: MsgHdrs | undefined): string | undefined {
  const v = h?.get('traceparent');
  return v ? v : undefined;
}

/**
 * A chunk gets spans at every stage when `seq % every === 0`: the same chunks all the way, so a
 * sampled chunk's spans form a chain (capture -> dedup -> delta -> compress -> sender).
 */
export function chunkTraced(seq: number, every: number | undefined): boolean {
  return seq % Math.max(1, every ?? 1) === 0;
}

// Metrics: what every stage reports per chunk, as counters by stage and mode.
const meter = () => metrics.getMeter('cloudlet-handoff');
let instruments:
  | {
      chunks: ReturnType<ReturnType<typeof meter>['createCounter']>;
      bytesIn: ReturnType<ReturnType<typeof meter>['createCounter']>;
      bytesOut: ReturnType<ReturnType<typeof meter>['createCounter']>;
      cpuMs: ReturnType<ReturnType<typeof meter>['createCounter']>;
      bandwidth: ReturnType<ReturnType<typeof meter>['createGauge']>;
    }
  | undefined;

function instrumentsOf(): NonNullable<typeof instruments> {
  return (instruments ??= {
    chunks: meter().createCounter('handoff_chunks', { description: 'chunks handled, by stage and mode' }),
    bytesIn: meter().createCounter('handoff_bytes_in', { unit: 'By' }),
    bytesOut: meter().createCounter('handoff_bytes_out', { unit: 'By' }),
    cpuMs: meter().createCounter('handoff_cpu', { unit: 'ms' }),
    bandwidth: meter().createGauge('handoff_bandwidth', { unit: 'bit/s', description: 'WAN bandwidth measured from the receiver ACKs, by migration' }),
  });
}

/** Records one chunk's statistics (called wherever they are published). */
export function recordStats(s: StageStats): void {
  const instruments = instrumentsOf();
  const labels = { stage: s.stage, mode: `${s.mode.delta}+${s.mode.compressor}${s.mode.compressor === 'zstd' ? s.mode.level : ''}` };
  instruments.chunks.add(1, labels);
  instruments.bytesIn.add(s.bytesIn, labels);
  instruments.bytesOut.add(s.bytesOut, labels);
  instruments.cpuMs.add(s.cpuMs, labels);
}

/** Records a link report's bandwidth (each migration has its own link). */
export function recordLinkReport(r: LinkReport): void {
  if (r.bandwidthBps) instrumentsOf().bandwidth.record(r.bandwidthBps, { migration: r.migrationId });
}

/** A queue-depth gauge, read when scraped (a failed read leaves it out of that scrape). */
export function observeQueueDepth(read: () => Promise<Record<string, number>>): void {
  meter()
    .createObservableGauge('handoff_queue_depth', { description: 'messages waiting in each work queue' })
    .addCallback(async (result) => {
      const depths = await read().catch(() => ({}));
      for (const [stage, depth] of Object.entries(depths)) result.observe(depth, { stage });
    });
}
