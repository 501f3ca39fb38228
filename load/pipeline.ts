/**
 * npm run load:pipeline — throughput of each stage alone and of the whole pipeline, per mode, every
 * actor a separate process on a real nats-server; wire bytes against zstd -19 of the dedup survivors.
 *
 * Stage alone: the stages run one after another on the same bus, each draining what the previous one
 * left in its input stream, so each is timed alone (from its first chunk to its stream drained).
 * Whole pipeline: one `migrate` with all actors running at once, timed from acceptance to verified.
 * All figures are MB/s of dirty input (decimal MB), so they compare side by side.
 */
import { spawnSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { spawnActor, stopActors, type ActorName, type ActorProcess } from '../cli/actors.js';
import { migrate } from '../cli/migrate.js';
import { spawnReceiverProcess } from '../cli/receive.js';
import { formatTable } from '../cli/summary.js';
import { ChunkBuilder, dirtyPagesOf } from '../services/capture/core.js';
import { HashLocationMap, addBaseIndex, dedupChunk } from '../services/dedup/core.js';
import { loadBaseIndex } from '../shared/image/base-index.js';
import { connectBus, publishEvent, streamOf, type Bus } from '../shared/bus/bus.js';
import { PageKind } from '../shared/model/chunk.js';
import { BlockCompressor } from '../shared/codecs/block.js';
import { parseEvent, type MigrationDescriptor, type MigrationEvent, type StageStats } from '../shared/model/migration.js';
import { formatMode, type Mode } from '../shared/model/mode.js';
import { startEmbeddedNats } from '../shared/bus/nats-server.js';
import { PAGE_SIZE } from '../shared/image/pages.js';
import { STREAMS, durableName, eventSubject, statsSubject, type WorkStage } from '../shared/bus/subjects.js';
import { generateImageSet, type ImageSet } from '../shared/testdata/images.js';
import { parseSizeBytes } from '../shared/config/units.js';
import { chunkPagesFor } from '../cli/migrate.js';
import { waitDrained } from './lib/processes.js';
import { readFile } from 'node:fs/promises';

const MODES: { name: string; mode: Mode }[] = [
  { name: 'raw', mode: { delta: 'none', compressor: 'none', level: 0 } },
  { name: 'lz4', mode: { delta: 'none', compressor: 'lz4', level: 0 } },
  { name: 'xor+zstd1', mode: { delta: 'xor', compressor: 'zstd', level: 1 } },
  { name: 'xor+zstd3', mode: { delta: 'xor', compressor: 'zstd', level: 3 } },
  { name: 'zdelta+zstd19', mode: { delta: 'zstd', compressor: 'zstd', level: 19 } },
];

const MB = 1e6;

interface StagedResult {
  stageMBps: Partial<Record<ActorName, number>>;
}

interface Row {
  name: string;
  mode: string;
  staged: StagedResult['stageMBps'];
  pipelineMBps: number;
  transferSeconds: number;
  inputBytes: number;
  wireBytes: number;
  verified: boolean;
}

function waitEvent(bus: Bus, migrationId: string, types: MigrationEvent['type'][]): Promise<MigrationEvent> {
  return (async () => {
    const events = await (await bus.js.consumers.get(STREAMS.events, { filter_subjects: eventSubject(migrationId, '*') })).consume();
    for await (const m of events) {
      const e = parseEvent(m.data);
      if (types.includes(e.type)) {
        events.stop();
        return e;
      }
      if (e.type === 'failed' || e.type === 'refused') throw new Error(`${e.type}: ${JSON.stringify(e)}`);
    }
    throw new Error('event stream ended');
  })();
}

/** Each stage alone: start it, wait until it has drained its input, stop it, start the next. */
async function staged(images: ImageSet, mode: Mode, inputBytes: number, compressWorkers: number): Promise<StagedResult> {
  // each stage queues everything for the next one: here the streams must hold a whole migration
  // (set before the first connection creates them; the whole-pipeline run keeps the defaults)
  process.env.HANDOFF_STREAM_MAX_BYTES = String(8 * 1024 ** 3);
  process.env.HANDOFF_WIRE_STREAM_MAX_BYTES = String(8 * 1024 ** 3);
  const nats = await startEmbeddedNats();
  const bus = await connectBus(nats.url, 'bench');
  const dir = await mkdtemp(join(tmpdir(), 'bench-dest-'));
  const receiver = await spawnReceiverProcess({ baseMemory: images.baseMemory, baseDisk: images.baseDisk, outDir: join(dir, 'out') });
  const migrationId = `bench-${Date.now()}`;
  const [mi, di] = await Promise.all([loadBaseIndex(images.baseMemory), loadBaseIndex(images.baseDisk)]);
  const descriptor: MigrationDescriptor = {
    migrationId,
    createdAtMs: Date.now(),
    memory: { base: images.baseMemory, current: images.memory, baseHash: mi.contentHash, bytes: mi.bytes },
    disk: { base: images.baseDisk, current: images.disk, baseHash: di.contentHash, bytes: di.bytes },
    destination: receiver.address,
    parts: 1,
    chunkPages: chunkPagesFor(bus.maxPayloadBytes),
    bandwidthCapBps: 0,
    mode,
  };
  await bus.migrations.put(migrationId, JSON.stringify(descriptor));
  await bus.config.put(migrationId, JSON.stringify(mode));
  // first chunk's start (its arrival minus its own processing time) per stage
  const firstStartMs = new Map<string, number>();
  const sub = bus.nc.subscribe(statsSubject(migrationId, '*'), {
    callback: (_e, msg) => {
      const s = JSON.parse(msg.string()) as StageStats;
      if (!firstStartMs.has(s.stage)) firstStartMs.set(s.stage, performance.now() - s.wallMs);
    },
  });
  const result: StagedResult = { stageMBps: {} };
  const run = async (actor: ActorName, count: number, until: () => Promise<void>): Promise<void> => {
    const procs: ActorProcess[] = Array.from({ length: count }, () => spawnActor(actor, nats.url, actor === 'dedup' ? { partition: 0 } : {}));
    try {
      await until();
      const end = performance.now();
      const start = firstStartMs.get(actor === 'sender' ? 'sender' : actor);
      if (start !== undefined) result.stageMBps[actor] = inputBytes / MB / ((end - start) / 1000);
    } finally {
      await stopActors(procs);
    }
  };
  try {
    await run('capture', 1, async () => {
      const captured = waitEvent(bus, migrationId, ['captured']);
      await publishEvent(bus, migrationId, { type: 'accepted', destinationBaseHashes: { memory: mi.contentHash, disk: di.contentHash } });
      await captured;
    });
    const drain = (stage: WorkStage, partition?: number) => () => waitDrained(bus, streamOf(stage), durableName(stage, partition));
    await run('dedup', 1, drain('dedup', 0));
    if (mode.delta !== 'none') await run('delta', 1, drain('delta'));
    if (mode.compressor !== 'none') await run('compress', compressWorkers, drain('compress'));
    await run('sender', 1, async () => {
      const done = waitEvent(bus, migrationId, ['result']);
      await publishEvent(bus, migrationId, { type: 'start' });
      const e = await done;
      if (e.type === 'result' && !e.result.verified) throw new Error(`not verified: ${e.result.reason}`);
    });
    return result;
  } finally {
    delete process.env.HANDOFF_STREAM_MAX_BYTES;
    delete process.env.HANDOFF_WIRE_STREAM_MAX_BYTES;
    sub.unsubscribe();
    receiver.child.kill('SIGTERM');
    await receiver.exited;
    await bus.close();
    await nats.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

async function whole(images: ImageSet, mode: Mode, compressWorkers: number): Promise<Omit<Row, 'name' | 'mode' | 'staged'>> {
  const dir = await mkdtemp(join(tmpdir(), 'bench-dest-'));
  const receiver = await spawnReceiverProcess({ baseMemory: images.baseMemory, baseDisk: images.baseDisk, outDir: join(dir, 'out') });
  try {
    const s = await migrate({
      ...images,
      to: receiver.address,
      mode,
      compressWorkers,
      dedupInstances: 1,
      bandwidthCapBps: 0,
      spawnActors: true,
      progress: false,
    });
    await receiver.exited;
    return { pipelineMBps: s.inputBytes / MB / s.transferSeconds, transferSeconds: s.transferSeconds, inputBytes: s.inputBytes, wireBytes: s.wireBytes, verified: s.verified };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** The dirty pages that survive dedup, concatenated, and their size under zstd -19. */
async function zstd19OfSurvivors(images: ImageSet, dir: string): Promise<{ survivorBytes: number; zstd19Bytes: number; tool: string }> {
  const base = new HashLocationMap();
  const indexes = await Promise.all([loadBaseIndex(images.baseMemory), loadBaseIndex(images.baseDisk)]);
  addBaseIndex(base, 0, indexes[0].hashes);
  addBaseIndex(base, 1, indexes[1].hashes);
  const sent = new HashLocationMap();
  const bodies: Uint8Array[] = [];
  for (const [image, path] of [[0, images.memory], [1, images.disk]] as const) {
    const data = await readFile(path);
    const builder = new ChunkBuilder({ migrationId: 'zstd19', round: 0, image, parts: 1 }, 256);
    const flush = (): void => {
      for (const slice of builder.take()) {
        const { chunk } = dedupChunk(slice, base, sent);
        let at = 0;
        for (let i = 0; i < chunk.kind.length; i++) {
          if (chunk.kind[i] === PageKind.Raw) bodies.push(chunk.body.subarray(at, at + PAGE_SIZE));
          at += chunk.bodyLength[i]!;
        }
      }
    };
    for (const page of dirtyPagesOf(data, 0, indexes[image].hashes)) if (builder.add(page)) flush();
    if (builder.pending) flush();
  }
  const survivors = Buffer.concat(bodies);
  const file = join(dir, 'survivors.bin');
  await writeFile(file, survivors);
  const cli = spawnSync('zstd', ['-19', '-q', '-c', file], { maxBuffer: 2 * survivors.byteLength + (1 << 20) });
  if (cli.status === 0 && cli.stdout) return { survivorBytes: survivors.byteLength, zstd19Bytes: cli.stdout.byteLength, tool: 'zstd -19' };
  // no zstd CLI: the same library at the same level, one frame
  return { survivorBytes: survivors.byteLength, zstd19Bytes: new BlockCompressor().compress(survivors, 'zstd', 19).byteLength, tool: 'libzstd level 19' };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      'memory-size': { type: 'string', default: '256MiB' },
      'disk-size': { type: 'string', default: '256MiB' },
      dirty: { type: 'string', default: '0.5' },
      'compress-workers': { type: 'string', default: '2' },
      modes: { type: 'string' },
      json: { type: 'boolean', default: false },
    },
  });
  const compressWorkers = Number(values['compress-workers']);
  const modes = values.modes ? MODES.filter((m) => values.modes!.split(',').includes(m.name)) : MODES;
  const dir = await mkdtemp(join(tmpdir(), 'bench-pipeline-'));
  try {
    const images = await generateImageSet({ dir, memoryBytes: parseSizeBytes(values['memory-size']!), diskBytes: parseSizeBytes(values['disk-size']!), dirtyFraction: Number(values.dirty) });
    const reference = await zstd19OfSurvivors(images, dir);
    const rows: Row[] = [];
    for (const { name, mode } of modes) {
      const w = await whole(images, mode, compressWorkers);
      process.stderr.write(`${name}: pipeline ${w.pipelineMBps.toFixed(1)} MB/s, wire ${w.wireBytes}\n`);
      const s = await staged(images, mode, w.inputBytes, compressWorkers);
      rows.push({ name, mode: formatMode(mode), staged: s.stageMBps, ...w });
    }
    const fmt = (v: number | undefined): string => (v === undefined ? '-' : v.toFixed(0));
    const table = [
      ['mode', 'capture', 'dedup', 'delta', `compress x${compressWorkers}`, 'sender+dest', 'pipeline', 'wire MB', `wire / ${reference.tool}`, 'verified'],
      ...rows.map((r) => [
        r.name,
        fmt(r.staged.capture),
        fmt(r.staged.dedup),
        fmt(r.staged.delta),
        fmt(r.staged.compress),
        fmt(r.staged.sender),
        r.pipelineMBps.toFixed(1),
        (r.wireBytes / MB).toFixed(1),
        (r.wireBytes / reference.zstd19Bytes).toFixed(3),
        String(r.verified),
      ]),
    ];
    const input = rows[0]?.inputBytes ?? 0;
    if (values.json) {
      console.log(JSON.stringify({ inputBytes: input, survivorBytes: reference.survivorBytes, zstd19Bytes: reference.zstd19Bytes, reference: reference.tool, compressWorkers, rows }));
    } else {
      console.log(`dirty input ${(input / MB).toFixed(1)} MB; after dedup ${(reference.survivorBytes / MB).toFixed(1)} MB; ${reference.tool} of those: ${(reference.zstd19Bytes / MB).toFixed(2)} MB`);
      console.log('throughput in MB/s of dirty input (stage columns: that stage alone, as its own process, through the bus)');
      console.log(formatTable(table));
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
