/**
 * NATS authentication for every actor: user/password (in the URL or the environment) or an nkey
 * seed. Secrets come from the environment or files, never from a command line another user can
 * read: a URL with credentials is split, and child processes get them through their environment.
 */
import { secretFromEnv } from '../config/secrets.js';
import { nkeyAuthenticator, type Authenticator } from '@nats-io/transport-node';

export interface NatsAuth {
  user?: string;
  pass?: string;
  /** an nkey user seed ("SU...") */
  nkeySeed?: string;
}

/** Environment variables an actor reads (a *_FILE variant names a file holding the value). */
export const NATS_AUTH_ENV = {
  user: 'HANDOFF_NATS_USER',
  pass: 'HANDOFF_NATS_PASSWORD',
  nkeySeed: 'HANDOFF_NATS_NKEY_SEED',
} as const;

/** A credential as text (a file's trailing newline dropped). */
function fromEnv(name: string, env: NodeJS.ProcessEnv): string | undefined {
  return env[name] || secretFromEnv(name, env)?.toString('utf8').trim();
}

/** Splits `nats://user:pass@host:port` into a URL without credentials and the credentials. */
export function splitNatsUrl(url: string): { servers: string; auth: NatsAuth } {
  const m = /^([a-z]+:\/\/)?([^@/]*)@(.+)$/i.exec(url);
  if (!m) return { servers: url, auth: {} };
  const [user, ...rest] = m[2]!.split(':');
  const auth: NatsAuth = { user: decodeURIComponent(user!) };
  if (rest.length) auth.pass = decodeURIComponent(rest.join(':'));
  return { servers: `${m[1] ?? ''}${m[3]}`, auth };
}

/** Credentials for `url`: those in the URL win, else the environment's. */
export function natsAuthFor(url: string, env: NodeJS.ProcessEnv = process.env): { servers: string; auth: NatsAuth } {
  const { servers, auth } = splitNatsUrl(url);
  if (auth.user !== undefined) return { servers, auth };
  const fromEnvAuth: NatsAuth = {};
  const user = fromEnv(NATS_AUTH_ENV.user, env);
  const pass = fromEnv(NATS_AUTH_ENV.pass, env);
  const nkeySeed = fromEnv(NATS_AUTH_ENV.nkeySeed, env);
  if (user !== undefined) fromEnvAuth.user = user;
  if (pass !== undefined) fromEnvAuth.pass = pass;
  if (nkeySeed !== undefined) fromEnvAuth.nkeySeed = nkeySeed;
  return { servers, auth: fromEnvAuth };
}

/** Connection options for the NATS client. */
export function natsConnectOptions(auth: NatsAuth): { user?: string; pass?: string; authenticator?: Authenticator } {
  if (auth.nkeySeed) {
    if (!/^SU[A-Z2-7]{56}$/.test(auth.nkeySeed)) throw new Error(`${NATS_AUTH_ENV.nkeySeed}: not an nkey user seed (expected "SU" and 56 base32 characters)`);
    return { authenticator: nkeyAuthenticator(new TextEncoder().encode(auth.nkeySeed)) };
  }
  return { ...(auth.user !== undefined ? { user: auth.user } : {}), ...(auth.pass !== undefined ? { pass: auth.pass } : {}) };
}

/** The environment a child process needs to connect to `url` as we do (credentials out of its argv). */
export function natsChildEnv(url: string, env: NodeJS.ProcessEnv = process.env): { url: string; env: NodeJS.ProcessEnv } {
  const { servers, auth } = natsAuthFor(url, env);
  const childEnv: NodeJS.ProcessEnv = { ...env };
  if (auth.user !== undefined) childEnv[NATS_AUTH_ENV.user] = auth.user;
  if (auth.pass !== undefined) childEnv[NATS_AUTH_ENV.pass] = auth.pass;
  if (auth.nkeySeed !== undefined) childEnv[NATS_AUTH_ENV.nkeySeed] = auth.nkeySeed;
  return { url: servers, env: childEnv };
}

/** A URL fit for logs: credentials replaced. */
export function redactNatsUrl(url: string): string {
  return url.replace(/\/\/[^@/]*@/, '//***@');
}
