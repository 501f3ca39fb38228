/**
 * Who may use the WAN link, and its encryption: TLS 1.3 with a pre-shared key (both ends prove
 * they hold it; OpenSSL's psk_dhe_ke adds forward secrecy) or with certificates from one CA on
 * both sides (mutual TLS). OpenSSL does the cryptography: nothing hand-rolled here.
 * Plain TCP only when asked for explicitly (HANDOFF_LINK_INSECURE=1).
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { secretFromEnv } from '../config/secrets.js';
import { connect as netConnect, createServer as netCreateServer, type Server, type Socket } from 'node:net';
import { connect as tlsConnect, createServer as tlsCreateServer, type TLSSocket } from 'node:tls';

export type LinkSecurity =
  | { kind: 'psk'; key: Buffer; identity: string }
  | { kind: 'mtls'; cert: Buffer; key: Buffer; ca: Buffer }
  | { kind: 'insecure' };

export const LINK_ENV = {
  psk: 'HANDOFF_LINK_PSK',
  cert: 'HANDOFF_LINK_CERT',
  key: 'HANDOFF_LINK_KEY',
  ca: 'HANDOFF_LINK_CA',
  insecure: 'HANDOFF_LINK_INSECURE',
} as const;

export class LinkSecurityError extends Error {
  override name = 'LinkSecurityError';
}

/** The peer did not accept our credentials (or offered none we accept): no retry will help. */
export class LinkAuthError extends Error {
  override name = 'LinkAuthError';
}

const PSK_IDENTITY = 'cloudlet-handoff';
/** TLS 1.3 suites (chosen by OpenSSL; PSK needs a SHA-256 one to match the key's hash) */
const TLS13 = { minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3' } as const;

/** A PEM value or a file holding it: HANDOFF_LINK_CERT may be either. */
function readPem(name: string, env: NodeJS.ProcessEnv): Buffer | undefined {
  const value = env[name];
  if (value && !value.includes('-----BEGIN')) {
    try {
      return readFileSync(value);
    } catch (err) {
      throw new LinkSecurityError(`${name}: cannot read ${value}: ${(err as Error).message}`);
    }
  }
  return secretFromEnv(name, env);
}

/** The key as hex (64+ digits = 32+ bytes), or raw bytes from a file. */
function parsePsk(raw: Buffer): Buffer {
  const text = raw.toString('utf8').trim();
  const key = /^[0-9a-f]+$/i.test(text) && text.length % 2 === 0 ? Buffer.from(text, 'hex') : raw;
  if (key.byteLength < 32) throw new LinkSecurityError(`${LINK_ENV.psk}: the pre-shared key must have at least 32 bytes (64 hex digits), not ${key.byteLength}`);
  return key;
}

/** Reads the link's credentials from the environment (both ends use the same variables). */
export function linkSecurityFromEnv(env: NodeJS.ProcessEnv = process.env): LinkSecurity {
  const psk = secretFromEnv(LINK_ENV.psk, env);
  const cert = readPem(LINK_ENV.cert, env);
  const key = readPem(LINK_ENV.key, env);
  const ca = readPem(LINK_ENV.ca, env);
  if (psk && cert) throw new LinkSecurityError(`set either ${LINK_ENV.psk} or ${LINK_ENV.cert}, not both`);
  if (psk) return { kind: 'psk', key: parsePsk(psk), identity: PSK_IDENTITY };
  if (cert || key || ca) {
    if (!cert || !key || !ca) throw new LinkSecurityError(`mutual TLS needs ${LINK_ENV.cert}, ${LINK_ENV.key} and ${LINK_ENV.ca} (missing ${[!cert && 'cert', !key && 'key', !ca && 'CA'].filter(Boolean).join(', ')})`);
    return { kind: 'mtls', cert, key, ca };
  }
  if (env[LINK_ENV.insecure] === '1') return { kind: 'insecure' };
  throw new LinkSecurityError(
    `the WAN link needs credentials: ${LINK_ENV.psk} (or ${LINK_ENV.psk}_FILE) with a key of 32+ bytes, or ${LINK_ENV.cert}/${LINK_ENV.key}/${LINK_ENV.ca} for mutual TLS; ${LINK_ENV.insecure}=1 allows plain TCP`,
  );
}

/**
 * For commands that run both ends on this machine (demo, tests, benchmarks): a fresh random key
 * when none is configured, so that the local run is authenticated and encrypted too.
 */
export function ensureLocalLinkKey(env: NodeJS.ProcessEnv = process.env): void {
  if (!env[LINK_ENV.psk] && !env[`${LINK_ENV.psk}_FILE`] && !env[LINK_ENV.cert] && env[LINK_ENV.insecure] !== '1') {
    env[LINK_ENV.psk] = randomBytes(32).toString('hex');
  }
}

/** Names the likely cause of a failed TLS handshake, for the logs of both ends: an authentication failure or another error. */
export function explainHandshakeError(err: Error, security: LinkSecurity): Error {
  const m = err.message;
  if (security.kind === 'psk' && /binder does not verify|illegal parameter|decrypt/i.test(m)) return new LinkAuthError('authentication failed: the peer holds another pre-shared key');
  if (/wrong version number|unknown protocol|http request|packet length too long/i.test(m)) return new LinkAuthError('authentication failed: the peer does not speak TLS (no link credentials configured on its side?)');
  if (/no shared cipher|no suitable|handshake failure|psk/i.test(m)) return new LinkAuthError(`authentication failed: the peer offered no acceptable credential (${security.kind === 'psk' ? 'no pre-shared key' : 'no certificate'}?)`);
  if (/certificate|unable to verify|self.signed|verify/i.test(m)) return new LinkAuthError(`authentication failed: certificate not accepted (${m.split('\n')[0]})`);
  return new Error(m.split('\n')[0]!);
}

/** Connects to the destination; resolves once the link is authenticated (TLS) or connected (insecure). */
export function dialLink(host: string, port: number, security: LinkSecurity, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    let socket: Socket | TLSSocket;
    const readyEvent = security.kind === 'insecure' ? 'connect' : 'secureConnect';
    if (security.kind === 'insecure') socket = netConnect({ host, port, noDelay: true });
    else if (security.kind === 'psk') {
      socket = tlsConnect({
        host,
        port,
        ...TLS13,
        pskCallback: () => ({ psk: security.key, identity: security.identity }),
        checkServerIdentity: () => undefined,
      });
    } else {
      // the CA is the deployment's own: a certificate it signed is the proof; host names of
      // cloudlets addressed by IP are not checked
      socket = tlsConnect({ host, port, ...TLS13, cert: security.cert, key: security.key, ca: security.ca, checkServerIdentity: () => undefined });
    }
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no answer within ${timeoutMs / 1000} s`));
    }, timeoutMs);
    socket.once(readyEvent, () => {
      clearTimeout(timer);
      socket.setNoDelay(true);
      socket.removeAllListeners('error');
      resolve(socket);
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      socket.destroy();
      reject(security.kind === 'insecure' ? err : explainHandshakeError(err, security));
    });
    // a peer that closes during the handshake (it refused our credentials) ends here
    socket.once('close', () => {
      clearTimeout(timer);
      reject(security.kind === 'insecure' ? new Error('connection closed') : new LinkAuthError('authentication failed: the destination closed the link during the TLS handshake'));
    });
  });
}

/** A listening server whose connections are authenticated before `onConnection` sees them. */
export function createLinkServer(security: LinkSecurity, onConnection: (socket: Socket) => void, onRefused: (peer: string, reason: string) => void): Server {
  if (security.kind === 'insecure') return netCreateServer({ noDelay: true }, onConnection);
  const secured = (socket: Socket): void => {
    socket.setNoDelay(true);
    onConnection(socket);
  };
  const server =
    security.kind === 'psk'
      ? tlsCreateServer({ ...TLS13, pskCallback: (_socket, identity) => (identity === security.identity ? security.key : null) }, secured)
      : tlsCreateServer({ ...TLS13, cert: security.cert, key: security.key, ca: security.ca, requestCert: true, rejectUnauthorized: true }, secured);
  server.on('tlsClientError', (err, socket) => {
    onRefused(`${socket.remoteAddress}:${socket.remotePort}`, explainHandshakeError(err, security).message);
    socket.destroy();
  });
  return server;
}
