/**
 * The embedded default: a private nats-server with JetStream on, a random port and a temporary
 * store, started when a command is given no --nats URL and stopped when it ends.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { stopProcess } from '../actor/child.js';
import { NATS_MAX_PAYLOAD_BYTES } from '../config/limits.js';

export interface EmbeddedNats {
  url: string;
  storeDir: string;
  stop(): Promise<void>;
}

export interface EmbeddedNatsOptions {
  /** largest message the server accepts (default NATS_MAX_PAYLOAD_BYTES); chunks are sized to fit it */
  maxPayloadBytes?: number;
  /** fixed port (e.g. to restart a server on the same address), default: a free one */
  port?: number;
  storeDir?: string;
  host?: string;
  /**
   * Who may connect: default a generated user and password (put into the returned URL, which
   * connectBus splits again); an nkey's public key; or false for none (tests of refusal).
   */
  auth?: { user: string; password: string } | { nkey: string } | false;
  /** accept leaf nodes (other hosts of this cloudlet) on this port, with these credentials */
  leafHub?: { port: number; user: string; password: string; domain: string };
  /**
   * Be a leaf node of the hub at this URL (nats-leaf://user:password@host:port), without JetStream
   * of its own: its clients reach the hub's streams through it.
   */
  leafOf?: string;
  /** a command the server runs under, e.g. ['ip', 'netns', 'exec', NS] on another host */
  prefix?: string[];
}

/** NATS_SERVER_BIN, else nats-server on PATH, else where Debian's package puts it (/usr/sbin, not on every user's PATH). */
export const NATS_SERVER_BIN =
  process.env.NATS_SERVER_BIN ??
  ((process.env.PATH ?? '').split(':').some((dir) => dir && existsSync(join(dir, 'nats-server')))
    ? 'nats-server'
    : (['/usr/sbin/nats-server', '/usr/bin/nats-server'].find((p) => existsSync(p)) ?? 'nats-server'));

export async function startEmbeddedNats(options: EmbeddedNatsOptions = {}): Promise<EmbeddedNats> {
  const ownStore = options.storeDir === undefined;
  const storeDir = options.storeDir ?? (await mkdtemp(join(tmpdir(), 'handoff-nats-')));
  const host = options.host ?? '127.0.0.1';
  const config = join(storeDir, 'nats.conf');
  const auth = options.auth ?? { user: 'handoff', password: randomBytes(18).toString('base64url') };
  const authorization = !auth
    ? []
    : 'nkey' in auth
      ? [`authorization { users: [ { nkey: "${auth.nkey}" } ] }`]
      : [`authorization { user: "${auth.user}", password: "${auth.password}" }`];
  await writeFile(
    config,
    [
      `listen: "${host}:${options.port ?? -1}"`,
      `max_payload: ${options.maxPayloadBytes ?? NATS_MAX_PAYLOAD_BYTES}`,
      // a hub names its JetStream domain, through which its leaf nodes' clients reach it
      ...(options.leafOf ? [`leafnodes { remotes: [ { url: "${options.leafOf}" } ] }`] : [`jetstream { store_dir: "${join(storeDir, 'js')}"${options.leafHub ? `, domain: "${options.leafHub.domain}"` : ''} }`]),
      ...(options.leafHub ? [`leafnodes { port: ${options.leafHub.port}, authorization { user: "${options.leafHub.user}", password: "${options.leafHub.password}" } }`] : []),
      ...authorization,
      '',
    ].join('\n'),
    { mode: 0o600 },
  );
  const [command, ...prefixArgs] = options.prefix?.length ? [...options.prefix, NATS_SERVER_BIN] : [NATS_SERVER_BIN];
  const child = spawn(command!, [...prefixArgs, '-c', config], { stdio: ['ignore', 'ignore', 'pipe'] });
  const url = await new Promise<string>((resolve, reject) => {
    let log = '';
    const timer = setTimeout(() => reject(new Error(`nats-server did not start within 10 s:\n${log}`)), 10_000);
    child.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(
        err.code === 'ENOENT'
          ? new Error(`${NATS_SERVER_BIN} not found: install it (apt-get install nats-server, or ./run setup) or pass --nats URL`)
          : err,
      );
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`nats-server exited with code ${code}:\n${log}`));
    });
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (text: string) => {
      log += text;
      const m = /Listening for client connections on ([\d.:[\]a-f]+):(\d+)/.exec(log);
      if (m && log.includes('Server is ready')) {
        clearTimeout(timer);
        child.removeAllListeners('exit');
        const credentials = auth && 'user' in auth ? `${encodeURIComponent(auth.user)}:${encodeURIComponent(auth.password)}@` : '';
        resolve(`nats://${credentials}${m[1]}:${m[2]}`);
      }
    });
  });
  child.stderr!.removeAllListeners('data');
  child.stderr!.resume();
  return {
    url,
    storeDir,
    stop: async () => {
      await stopProcess(child, 5_000);
      if (ownStore) await rm(storeDir, { recursive: true, force: true });
    },
  };
}
