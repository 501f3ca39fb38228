/**
 * A forward HTTP proxy (absolute-URI requests and CONNECT tunnels), so that builds inside a network
 * namespace with no route out reach Debian's and npm's registries through this host. Only the hosts
 * it is given are reached: others are refused (403) and recorded, as a closed network would.
 */
import { createServer, request, type Server } from 'node:http';
import { connect } from 'node:net';
import type { Duplex } from 'node:stream';

export interface HttpProxy {
  url: string;
  /** host:port of every request let through, in order */
  targets: string[];
  /** host:port of every request refused (not among the allowed hosts) */
  refused: string[];
  close(): Promise<void>;
}

export async function startHttpProxy(host: string, allowedHosts: readonly string[]): Promise<HttpProxy> {
  const targets: string[] = [];
  const refused: string[] = [];
  const allowed = (hostPort: string): boolean => {
    const ok = allowedHosts.includes(hostPort.replace(/:\d+$/, ''));
    (ok ? targets : refused).push(hostPort);
    return ok;
  };
  // tunnels leave the server's connection tracking once upgraded: closed here at the end
  const tunnels = new Set<Duplex>();
  const server: Server = createServer((req, res) => {
    let target: URL;
    try {
      target = new URL(req.url ?? '');
    } catch {
      res.writeHead(400).end('absolute URI expected');
      return;
    }
    if (!allowed(target.host)) {
      res.writeHead(403).end(`${target.host} is not reachable from here`);
      return;
    }
    const upstream = request(target, { method: req.method, headers: req.headers }, (up) => {
      res.writeHead(up.statusCode ?? 502, up.headers);
      up.pipe(res);
    });
    upstream.on('error', (e) => res.headersSent ? res.destroy() : res.writeHead(502).end(e.message));
    req.pipe(upstream);
  });
  server.on('connect', (req, client, head) => {
    const [h, p] = (req.url ?? '').split(':');
    if (!allowed(req.url ?? '')) {
      client.end('HTTP/1.1 403 Forbidden\r\n\r\n');
      return;
    }
    let established = false;
    const upstream = connect(Number(p) || 443, h ?? '', () => {
      established = true;
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      upstream.write(head);
      upstream.pipe(client);
      client.pipe(upstream);
    });
    const drop = (): void => {
      upstream.destroy();
      client.destroy();
    };
    tunnels.add(client);
    client.on('close', () => tunnels.delete(client));
    // before the tunnel: a 502 the client can read; inside it, only a cut connection
    upstream.on('error', () => (established ? drop() : client.end('HTTP/1.1 502 Bad Gateway\r\n\r\n')));
    client.on('error', drop);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, host, resolve);
  });
  const { port } = server.address() as { port: number };
  return {
    url: `http://${host}:${port}`,
    targets,
    refused,
    close: () => new Promise<void>((resolve) => {
      server.closeAllConnections();
      for (const t of tunnels) t.destroy();
      server.close(() => resolve());
    }),
  };
}
