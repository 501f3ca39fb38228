/** Two cloudlets for integration tests: a destination (own nats-server + receiver) and a source migration. */
import { copyFile, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { migrate, type MigrateOptions } from '../../cli/migrate.js';
import type { MigrationSummary } from '../../cli/summary.js';
import { startReceiver, type ReceivedMigration, type RunningReceiver } from '../../services/receiver/service.js';
import { ensureLocalLinkKey, type LinkSecurity } from '../../shared/wire/link-security.js';
import { DEFAULT_MODE } from '../../shared/model/mode.js';
import { startEmbeddedNats, type EmbeddedNats } from '../../shared/bus/nats-server.js';
import { generateImageSet, type ImageSet } from '../../shared/testdata/images.js';

// both cloudlets of a test share one fresh link key (the sender actor inherits it)
ensureLocalLinkKey();

export interface Workspace {
  dir: string;
  images: ImageSet;
  destBaseMemory: string;
  destBaseDisk: string;
  cleanup(): Promise<void>;
}

export async function makeWorkspace(memoryBytes = 16 << 20, diskBytes = 16 << 20, seed = 7): Promise<Workspace> {
  const dir = await mkdtemp(join(tmpdir(), 'handoff-test-'));
  const images = await generateImageSet({ dir: join(dir, 'source'), memoryBytes, diskBytes, seed });
  await mkdir(join(dir, 'destination'), { recursive: true });
  const destBaseMemory = join(dir, 'destination', 'base-memory.img');
  const destBaseDisk = join(dir, 'destination', 'base-disk.img');
  await copyFile(images.baseMemory, destBaseMemory);
  await copyFile(images.baseDisk, destBaseDisk);
  return { dir, images, destBaseMemory, destBaseDisk, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

export interface Destination {
  receiver: RunningReceiver;
  nats: EmbeddedNats;
  address: string;
  outDir: string;
  stop(): Promise<void>;
}

export async function startDestination(ws: Workspace, name = 'rebuilt', bases?: { memory: string; disk: string }, security?: LinkSecurity): Promise<Destination> {
  const nats = await startEmbeddedNats();
  const outDir = join(ws.dir, 'destination', name);
  const receiver = await startReceiver({
    listen: '127.0.0.1:0',
    baseMemory: bases?.memory ?? ws.destBaseMemory,
    baseDisk: bases?.disk ?? ws.destBaseDisk,
    outDir,
    natsUrl: nats.url,
    ...(security ? { security } : {}),
  }).catch(async (err: unknown) => {
    await nats.stop();
    throw err;
  });
  return {
    receiver,
    nats,
    outDir,
    address: `127.0.0.1:${receiver.address.port}`,
    stop: async () => {
      await receiver.stop();
      await nats.stop();
    },
  };
}

export function migrateOptions(ws: Workspace, to: string, extra: Partial<MigrateOptions> = {}): MigrateOptions {
  return {
    ...ws.images,
    to,
    mode: DEFAULT_MODE,
    compressWorkers: 1,
    dedupInstances: 1,
    bandwidthCapBps: 0,
    spawnActors: true,
    progress: false,
    ...extra,
  };
}

/** One handoff: source and destination, the summary and what the destination reported. */
export async function handoff(ws: Workspace, extra: Partial<MigrateOptions> = {}): Promise<{ summary: MigrationSummary; received: ReceivedMigration; dest: Destination }> {
  const dest = await startDestination(ws);
  try {
    const receivedP = dest.receiver.next();
    const summary = await migrate(migrateOptions(ws, dest.address, extra));
    const received = summary.rebuild ? await receivedP : await Promise.race([receivedP, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`no result: ${summary.reason}`)), 5000))]);
    return { summary, received, dest };
  } finally {
    await dest.stop();
  }
}
