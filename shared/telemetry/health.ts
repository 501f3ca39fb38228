/**
 * Health, readiness and metrics of one actor process over HTTP, for container orchestration and
 * Prometheus: GET /healthz (the process runs), /readyz (connected to NATS and consuming), /metrics.
 */
import { createServer, type Server } from 'node:http';
import type { Logger } from './log.js';
import type { Telemetry } from './telemetry.js';

export interface HealthChecks {
  /** connected and taking work */
  ready(): boolean;
}

/** Whether this process will serve health and metrics (HANDOFF_HEALTH_PORT set; its value is checked when the server starts). */
export function healthServerWanted(env: NodeJS.ProcessEnv = process.env): boolean {
  return Boolean(env.HANDOFF_HEALTH_PORT);
}

/** The port from HANDOFF_HEALTH_PORT (unset: no server). */
export function healthPortFromEnv(env: NodeJS.ProcessEnv = process.env): number | undefined {
  const text = env.HANDOFF_HEALTH_PORT;
  if (!text) return undefined;
  const port = Number(text);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new Error(`HANDOFF_HEALTH_PORT: ${JSON.stringify(text)} is not a port`);
  return port;
}

export async function startHealthServer(port: number, checks: HealthChecks, telemetry: Telemetry, log: Logger, host = process.env.HANDOFF_HEALTH_HOST ?? '0.0.0.0'): Promise<Server> {
  const server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET') return void res.writeHead(405).end();
    if (path === '/healthz') return void res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
    if (path === '/readyz') {
      const ready = checks.ready();
      return void res.writeHead(ready ? 200 : 503, { 'content-type': 'text/plain' }).end(ready ? 'ready\n' : 'not ready\n');
    }
    if (path === '/metrics') return telemetry.serveMetrics(req, res);
    res.writeHead(404).end();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
  const bound = server.address();
  log.info('health listening', { port: typeof bound === 'object' && bound ? bound.port : port });
  return server;
}
