/**
 * What a process needs to read a running QEMU's own migration stream, shared by `handoff base`
 * (base-snapshot.ts) and the stream capture of a live handoff (services/capture/stream.ts): the
 * QEMU behind a QMP socket, the capabilities that must be off for the stream to carry plain pages,
 * a private socket QEMU migrates to, and cancelling a migration under way.
 */
import { chown, mkdtemp } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { errorMessage } from '../model/errors.js';
import { findQemuByQmpSocket, type QemuProcess } from './qemu-process.js';
import type { QmpClient, QmpEvent } from './qmp.js';

declare module './qmp.js' {
  interface QmpCommands {
    'query-migrate-capabilities': { args: undefined; result: { capability: string; state: boolean }[] };
    'query-migrate-parameters': { args: undefined; result: { 'tls-creds'?: string; 'downtime-limit'?: number; 'max-bandwidth'?: number } };
  }
}

/**
 * Capabilities that change what the stream carries or how (pages outside the main stream, encoded
 * pages, postcopy, RAM left out, a return path or a pause the reader would have to answer): all
 * off while this project reads the stream, whatever the VM's owner set.
 */
export const STREAM_CAPABILITIES_OFF = [
  'multifd',
  'xbzrle',
  'compress',
  'postcopy-ram',
  'postcopy-preempt',
  'x-ignore-shared',
  'return-path',
  'pause-before-switchover',
  'block',
  'dirty-bitmaps',
  'background-snapshot',
  'x-colo',
  'zero-copy-send',
];

/** query-migrate states of a migration still under way. */
export const MIGRATION_ACTIVE = new Set(['setup', 'active', 'device', 'pre-switchover', 'cancelling', 'wait-unplug', 'postcopy-active', 'postcopy-paused', 'postcopy-recover', 'colo']);

/**
 * The QEMU process behind the socket: as the path was given, else as an absolute path (QEMU may
 * have bound either). `makeError` builds the error that names why there is none.
 */
export function findQemuBehind(qmpSocket: string, makeError: (message: string) => Error = (m) => new Error(m)): QemuProcess {
  let first: unknown;
  for (const path of new Set([qmpSocket, resolve(qmpSocket)])) {
    try {
      return findQemuByQmpSocket(path);
    } catch (err) {
      first ??= err;
    }
  }
  throw makeError(`no QEMU behind the QMP socket ${qmpSocket}: ${errorMessage(first)}`);
}

/**
 * Sets the capabilities QEMU knows of `wanted` as asked (the ones it does not know are left out);
 * the returned function sets back those the owner had otherwise.
 */
export async function setMigrationCapabilities(qmp: QmpClient, wanted: Record<string, boolean>): Promise<() => Promise<void>> {
  const previous = new Map((await qmp.execute('query-migrate-capabilities')).map((c) => [c.capability, c.state]));
  const known = Object.entries(wanted).filter(([c]) => previous.has(c));
  const changed = known.filter(([c, state]) => previous.get(c) !== state);
  if (known.length) await qmp.execute('migrate-set-capabilities', { capabilities: known.map(([capability, state]) => ({ capability, state })) });
  return async () => {
    if (changed.length) await qmp.execute('migrate-set-capabilities', { capabilities: changed.map(([capability, state]) => ({ capability, state: !state })) });
  };
}

/** Every capability of STREAM_CAPABILITIES_OFF off. */
export function streamCapabilitiesOff(): Record<string, boolean> {
  return Object.fromEntries(STREAM_CAPABILITIES_OFF.map((c) => [c, false]));
}

/** A unix socket QEMU migrates to, in a private folder, owned by QEMU's user so that it alone can connect. */
export interface MigrationTarget {
  server: Server;
  socketDir: string;
  socketPath: string;
}

/** Listens on a fresh unix socket in a private folder, owned by QEMU's user so that it alone can connect. */
export async function listenForQemu(qemuUid: number, prefix = 'handoff-base-'): Promise<MigrationTarget> {
  const socketDir = await mkdtemp(join(tmpdir(), prefix));
  const asQemu = process.getuid?.() === 0 && qemuUid !== 0;
  if (asQemu) await chown(socketDir, qemuUid, -1);
  const socketPath = join(socketDir, 'migrate.sock');
  const server = createServer();
  await new Promise<void>((res, rej) => {
    server.once('error', rej);
    server.listen(socketPath, res);
  });
  if (asQemu) await chown(socketPath, qemuUid, -1);
  return { server, socketDir, socketPath };
}

/** QEMU's one connection to `server` (the server closes then); rejects with `onAbort()` when `signal` aborts first. */
export function acceptOne(server: Server, signal: AbortSignal, onAbort: () => Error): Promise<Socket> {
  return new Promise((resolvePromise, reject) => {
    const aborted = (): void => reject(onAbort());
    signal.addEventListener('abort', aborted, { once: true });
    server.once('connection', (socket: Socket) => {
      signal.removeEventListener('abort', aborted);
      // one migration, one connection
      server.close();
      resolvePromise(socket);
    });
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Cancels the migration if one runs, and waits (up to 10 s) until QEMU says it no longer does. */
export async function cancelMigration(qmp: QmpClient): Promise<void> {
  let s = await qmp.execute('query-migrate');
  if (!s.status || !MIGRATION_ACTIVE.has(s.status)) return;
  await qmp.execute('migrate_cancel');
  const deadline = Date.now() + 10_000;
  while (s.status && MIGRATION_ACTIVE.has(s.status) && Date.now() < deadline) {
    await sleep(20);
    s = await qmp.execute('query-migrate');
  }
}

/** A QMP event's time on QEMU's clock (epoch ms), where it carries one. */
export function eventMs(e: QmpEvent): number | undefined {
  return e.timestamp ? e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 : undefined;
}

/**
 * After a failure once `migrate` was sent: the migration cancelled if it runs on, `restore` (the
 * owner's settings back), and the guest running again if it ran before. Returns what could not be done.
 */
export async function recoverFromMigration(qmp: QmpClient, wasRunning: boolean, restore: () => Promise<void>): Promise<string | undefined> {
  try {
    await cancelMigration(qmp);
    await restore().catch(() => undefined);
    // QEMU resumes the guest itself when a migration fails; one that completed leaves it paused
    const status = await qmp.execute('query-status');
    if (wasRunning && !status.running && (status.status === 'postmigrate' || status.status === 'paused')) await qmp.execute('cont');
    return undefined;
  } catch (err) {
    return `the guest may be left paused (${errorMessage(err)}): resume it with QMP cont`;
  }
}
