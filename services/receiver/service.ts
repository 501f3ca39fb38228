/**
 * Receiver actor (destination cloudlet): accepts the WAN link after checking the source's base is
 * ours, applies each chunk to the rebuilt images before acknowledging it, verifies the images by
 * hash and reports the result back over the link and on the destination's bus (stats, result).
 * Its wiring in the actor shell is the link server (connection.ts); each migration's rebuild is in
 * migration.ts, the checks in verify.ts.
 */
import { mkdirSync } from 'node:fs';
import type { Server, Socket } from 'node:net';
import { loadBaseIndex } from '../../shared/image/base-index.js';
import { runActor, type ActorContext, type ActorDefinition, type ActorWiring } from '../../shared/actor/shell.js';
import { createLinkServer, linkSecurityFromEnv, type LinkSecurity } from '../../shared/wire/link-security.js';
import type { ImageDigests } from '../../shared/model/migration.js';
import { parseAddress } from '../../shared/wire/frames.js';
import { handleConnection } from './connection.js';
import { Migrations, type ReceivedMigration, type RebuildSetup } from './migration.js';
import type { ResumeOptions } from './resume.js';
import { nodeHostFiles, type StreamResumeOptions } from './stream-resumer.js';
import type { StreamDestination } from './stream-resume.js';
import type { Destination } from './verify.js';

export type { ReceivedMigration } from './migration.js';

export interface ReceiverOptions {
  listen: string;
  baseMemory: string;
  baseDisk: string;
  outDir: string;
  natsUrl: string;
  /** milliseconds to wait for the handshake of a new connection */
  helloTimeoutMs?: number;
  /** the link's credentials (default: from the environment, see shared/wire/link-security.ts) */
  security?: LinkSecurity;
  /** each migration's images in OUT/<migrationId>/ (a receiver serving many), else OUT/ */
  perMigrationDirs?: boolean;
  /** live handoffs: resume the VM here (without: refused) */
  vm?: ResumeOptions;
  /** live handoffs of the source's own machine from QEMU's stream: resume it here (without: refused) */
  stream?: StreamResumeOptions;
  /** a connection that brings nothing for this long is closed (default 120 s) */
  idleTimeoutMs?: number;
}

export interface RunningReceiver {
  address: { host: string; port: number };
  baseHashes: ImageDigests;
  /** each migration's outcome, in order */
  results: AsyncIterable<ReceivedMigration>;
  /** resolves with the first migration that finishes (success or not) */
  next(): Promise<ReceivedMigration>;
  stop(): Promise<void>;
}

/** The receiver's wiring: the link server listening, and the migrations' outcomes. */
export interface ReceiverWiring extends ActorWiring {
  address: { host: string; port: number };
  next(): Promise<ReceivedMigration>;
}

/** The receiver in the actor shell, rebuilding onto the base images `setup` names (their indexes loaded). */
export function receiverActor(options: ReceiverOptions, setup: RebuildSetup): ActorDefinition<ReceiverWiring> {
  return { name: 'receiver', start: (ctx) => startLinkServer(ctx, options, setup) };
}

export async function startReceiver(options: ReceiverOptions): Promise<RunningReceiver> {
  const [memoryIndex, diskIndex] = await Promise.all([loadBaseIndex(options.baseMemory), loadBaseIndex(options.baseDisk)]);
  const manifestHash = options.stream?.base.manifest.memory.contentHash;
  if (manifestHash !== undefined && manifestHash !== memoryIndex.contentHash) {
    throw new Error(`the base's memory image ${options.baseMemory} hashes to ${memoryIndex.contentHash}, its base.json says ${manifestHash}: it changed since the base was taken`);
  }
  mkdirSync(options.outDir, { recursive: true });
  const { baseMemory, baseDisk, outDir, perMigrationDirs, vm, stream } = options;
  const setup: RebuildSetup = { baseMemory, baseDisk, outDir, memoryIndex, diskIndex, perMigrationDirs, vm, stream };
  const actor = await runActor(receiverActor(options, setup), options.natsUrl);
  const next = actor.wiring.next;
  return {
    address: actor.wiring.address,
    baseHashes: { memory: memoryIndex.contentHash, disk: diskIndex.contentHash },
    next,
    results: {
      async *[Symbol.asyncIterator]() {
        for (;;) yield await next();
      },
    },
    stop: actor.stop,
  };
}

/** What a source's machine is checked against: the base's RAM blocks and disk, the operator's command line. */
function streamDestination(stream: StreamResumeOptions): StreamDestination {
  const { manifest } = stream.base;
  const disk = manifest.disks[0];
  if (!disk) throw new Error(`the base ${stream.base.dir} has no disk: a handoff carries one`);
  return { ramBlocks: manifest.ramBlocks, baseMachine: manifest.machine, diskDrive: disk.drive, host: nodeHostFiles, ...(stream.qemuCommand ? { qemuCommand: stream.qemuCommand } : {}) };
}

async function startLinkServer(ctx: ActorContext, options: ReceiverOptions, setup: RebuildSetup): Promise<ReceiverWiring> {
  const { log } = ctx;
  const destination: Destination = {
    baseHashes: { memory: setup.memoryIndex.contentHash, disk: setup.diskIndex.contentHash },
    bytes: { memory: setup.memoryIndex.bytes, disk: setup.diskIndex.bytes },
    resumesVms: options.vm !== undefined,
    ...(options.stream ? { stream: streamDestination(options.stream) } : {}),
  };
  const migrations = new Migrations(ctx, setup);
  const settings = { destination, helloTimeoutMs: options.helloTimeoutMs ?? 10_000, idleTimeoutMs: options.idleTimeoutMs ?? 120_000 };
  const sockets = new Set<Socket>();
  const { host, port } = parseAddress(options.listen, true);
  const security = options.security ?? linkSecurityFromEnv();
  const server: Server = createLinkServer(
    security,
    (socket) => {
      sockets.add(socket);
      socket.once('close', () => sockets.delete(socket));
      handleConnection(socket, migrations, settings, log);
    },
    (peer, reason) => log.warn('peer refused', { peer, reason }),
  );
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
  const addr = server.address();
  const address = typeof addr === 'object' && addr ? { host: addr.address, port: addr.port } : { host, port };
  const { baseHashes } = destination;
  log.info('listening', { address: `${address.host}:${address.port}`, link: security.kind, baseMemory: baseHashes.memory.slice(0, 16), baseDisk: baseHashes.disk.slice(0, 16) });

  let resolveDone: () => void = () => undefined;
  const done = new Promise<void>((resolve) => (resolveDone = resolve));
  return {
    address,
    next: () => migrations.results.next(),
    done,
    stop: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      migrations.abandonUnfinished();
      resolveDone();
    },
  };
}
