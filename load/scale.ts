/**
 * Scale-out benchmark: pipeline throughput with 1, 2 and 3 compress workers, and with a worker on
 * a second host of the cloudlet that joins the work queue through its own nats-server, a leaf node
 * of the first. Two network namespaces joined by a veth pair are the two hosts (root needed); the
 * script sets them up and removes them. Prints ratios to 1 worker; `--json` prints every run.
 *
 *   npm run load:scale -- [--memory-size 64MiB] [--disk-size 64MiB] [--mode zstd:9] [--repeat 1] [--json]
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { spawnActor, stopActors, type ActorProcess } from '../cli/actors.js';
import { spawnReceiverProcess } from '../cli/receive.js';
import { formatTable } from '../cli/summary.js';
import { stopProcess } from '../shared/actor/child.js';
import { generateImageSet } from '../shared/testdata/images.js';
import { parseSizeBytes } from '../shared/config/units.js';
import { JS_DOMAIN, migrateOn, startTwoHosts } from './lib/hosts.js';

const { values } = parseArgs({
  options: { 'memory-size': { type: 'string' }, 'disk-size': { type: 'string' }, mode: { type: 'string' }, repeat: { type: 'string' }, json: { type: 'boolean' } },
});
const repeat = Number(values.repeat ?? 1);
const mode = values.mode ?? 'zstd:9';

interface Setup {
  name: string;
  local: number;
  remote: number;
}
const SETUPS: Setup[] = [
  { name: '1 worker', local: 1, remote: 0 },
  { name: '2 workers', local: 2, remote: 0 },
  { name: '3 workers', local: 3, remote: 0 },
  { name: '1 + 1 on the second host', local: 1, remote: 1 },
  { name: '0 + 1 on the second host', local: 0, remote: 1 },
];

interface Run {
  setup: string;
  localWorkers: number;
  remoteWorkers: number;
  throughputMBps: number;
  transferSeconds: number;
  inputBytes: number;
  wireBytes: number;
  verified: boolean;
  chunksPerWorker: Record<string, number>;
}

if (process.getuid?.() !== 0) {
  console.error('load:scale needs root: it makes two network namespaces (the two hosts)');
  process.exit(2);
}

const dir = await mkdtemp(join(tmpdir(), 'handoff-scale-'));
const images = await generateImageSet({ dir: join(dir, 'source'), memoryBytes: parseSizeBytes(values['memory-size'] ?? '64MiB'), diskBytes: parseSizeBytes(values['disk-size'] ?? '64MiB'), seed: 9 });
const runs: Run[] = [];
try {
  const hosts = await startTwoHosts(`sc${process.pid % 10000}`);
  const { host1, host2, hub, leaf } = hosts;
  // the destination cloudlet: its own bus (no domain), on host 1's loopback
  const receiver = await spawnReceiverProcess({ baseMemory: images.baseMemory, baseDisk: images.baseDisk, outDir: join(dir, 'out'), listen: '127.0.0.1:7300', prefix: host1, serve: true });
  // every source-side process reaches JetStream by the hub's domain, wherever it runs
  process.env.HANDOFF_JS_DOMAIN = JS_DOMAIN;
  try {
    for (let r = 0; r < repeat; r++) {
      for (const setup of SETUPS) {
        const actors: ActorProcess[] = [
          spawnActor('capture', hub.url, { prefix: host1 }),
          spawnActor('dedup', hub.url, { partition: 0, prefix: host1 }),
          spawnActor('delta', hub.url, { prefix: host1 }),
          spawnActor('sender', hub.url, { prefix: host1 }),
          ...Array.from({ length: setup.local }, () => spawnActor('compress', hub.url, { prefix: host1 })),
          ...Array.from({ length: setup.remote }, () => spawnActor('compress', leaf.url, { prefix: host2 })),
        ];
        try {
          // actors need a moment to connect; a chunk published before a stage is ready waits in its queue
          await new Promise((res) => setTimeout(res, 1500));
          const i = images;
          const s = await migrateOn(host1, ['--external-actors', '--nats', hub.url, '--base-memory', i.baseMemory, '--memory', i.memory, '--base-disk', i.baseDisk, '--disk', i.disk, '--to', '127.0.0.1:7300', '--mode', mode, '--delta', 'xor']);
          runs.push({
            setup: setup.name,
            localWorkers: setup.local,
            remoteWorkers: setup.remote,
            throughputMBps: s.inputBytes / 1e6 / s.transferSeconds,
            transferSeconds: s.transferSeconds,
            inputBytes: s.inputBytes,
            wireBytes: s.wireBytes,
            verified: s.verified,
            chunksPerWorker: s.stages.compress?.perInstance ?? {},
          });
          if (!values.json) process.stderr.write(`${setup.name}: ${(s.inputBytes / 1e6 / s.transferSeconds).toFixed(1)} MB/s${s.verified ? '' : ` FAILED: ${s.reason}`}\n`);
        } finally {
          await stopActors(actors);
        }
      }
    }
  } finally {
    await stopProcess(receiver.child, 10_000);
    await hosts.destroy();
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}

const best = (name: string): Run => runs.filter((r) => r.setup === name).sort((a, b) => b.throughputMBps - a.throughputMBps)[0]!;
const base = best(SETUPS[0]!.name).throughputMBps;
if (values.json) console.log(JSON.stringify({ mode: `xor+${mode}`, runs }));
else {
  console.log(`\ncompress ${mode} after xor delta; dirty input ${(runs[0]!.inputBytes / 1e6).toFixed(1)} MB; best of ${repeat} run(s); this machine has 2 cores\n`);
  console.log(
    formatTable([
      ['compress workers', 'MB/s of dirty input', 'ratio to 1 worker', 'chunks per worker', 'verified'],
      ...SETUPS.map((s) => {
        const r = best(s.name);
        return [s.name, r.throughputMBps.toFixed(1), (r.throughputMBps / base).toFixed(2), Object.values(r.chunksPerWorker).join('/'), String(r.verified)];
      }),
    ]),
  );
}
process.exit(runs.every((r) => r.verified) ? 0 : 1);
