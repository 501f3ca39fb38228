/**
 * Soak: many handoffs back to back through one set of long-running actors and one serving
 * receiver, as a cloudlet runs them. Prints the resident memory (RSS) of every process after the
 * first and the last handoff: it should stay flat. `--json`: one object with every figure.
 *
 *   npm run load:soak -- [--count 30] [--memory-size 32MiB] [--disk-size 32MiB] [--json]
 */
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { spawnActor, stopActors, type ActorProcess } from '../cli/actors.js';
import { migrate } from '../cli/migrate.js';
import { spawnReceiverProcess } from '../cli/receive.js';
import { formatTable } from '../cli/summary.js';
import { stopProcess } from '../shared/actor/child.js';
import { DEFAULT_MODE } from '../shared/model/mode.js';
import { startEmbeddedNats } from '../shared/bus/nats-server.js';
import { generateImageSet } from '../shared/testdata/images.js';
import { parseSizeBytes } from '../shared/config/units.js';

const { values } = parseArgs({
  options: { count: { type: 'string' }, 'memory-size': { type: 'string' }, 'disk-size': { type: 'string' }, json: { type: 'boolean' } },
});
const count = Number(values.count ?? 30);

/** Resident set of a process in MiB, from /proc (0 when it is gone). */
function rssMiB(pid: number | undefined): number {
  if (!pid) return 0;
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : 0;
  } catch {
    return 0;
  }
}

interface Tracked {
  name: string;
  pid: number | undefined;
  samples: number[];
}

const dir = await mkdtemp(join(tmpdir(), 'handoff-soak-'));
const images = await generateImageSet({ dir: join(dir, 'source'), memoryBytes: parseSizeBytes(values['memory-size'] ?? '32MiB'), diskBytes: parseSizeBytes(values['disk-size'] ?? '32MiB'), seed: 5 });
const nats = await startEmbeddedNats();
const receiver = await spawnReceiverProcess({ baseMemory: images.baseMemory, baseDisk: images.baseDisk, outDir: join(dir, 'out'), serve: true });
const actors: ActorProcess[] = [
  spawnActor('capture', nats.url),
  spawnActor('dedup', nats.url, { partition: 0 }),
  spawnActor('delta', nats.url),
  spawnActor('compress', nats.url),
  spawnActor('compress', nats.url),
  spawnActor('sender', nats.url),
  spawnActor('tuner', nats.url),
];
const tracked: Tracked[] = [
  ...actors.map((a, i) => ({ name: a.name === 'compress' ? `compress-${i - 3}` : a.name, pid: a.child.pid, samples: [] as number[] })),
  { name: 'receiver', pid: receiver.child.pid, samples: [] },
  { name: 'control (this process)', pid: process.pid, samples: [] },
];

const seconds: number[] = [];
let verified = 0;
try {
  for (let i = 0; i < count; i++) {
    const summary = await migrate({
      ...images,
      to: receiver.address,
      mode: DEFAULT_MODE,
      adaptive: true,
      compressWorkers: 2,
      dedupInstances: 1,
      bandwidthCapBps: 0,
      natsUrl: nats.url,
      spawnActors: false,
      progress: false,
    });
    if (summary.verified) verified++;
    else process.stderr.write(`handoff ${i + 1} failed: ${summary.reason}\n`);
    seconds.push(summary.handoffSeconds);
    await rm(join(dir, 'out', summary.migrationId), { recursive: true, force: true });
    for (const t of tracked) t.samples.push(rssMiB(t.pid));
    if (!values.json) process.stderr.write(`\rhandoff ${i + 1}/${count}: ${summary.handoffSeconds.toFixed(2)} s, ${summary.verified ? 'verified' : 'FAILED'}   `);
  }
} finally {
  if (!values.json) process.stderr.write('\n');
  await stopActors(actors);
  await stopProcess(receiver.child, 10_000);
  await nats.stop();
  await rm(dir, { recursive: true, force: true });
}

/**
 * MiB per handoff over the second half (least squares): a heap that settles levels off after its
 * high-water marks (zstd contexts, V8's old space), a leak keeps climbing.
 */
function trend(s: number[]): number {
  const tail = s.slice(Math.floor(s.length / 2));
  const n = tail.length;
  if (n < 2) return 0;
  const mx = (n - 1) / 2;
  const my = tail.reduce((a, b) => a + b, 0) / n;
  let num = 0;
  let den = 0;
  tail.forEach((y, x) => {
    num += (x - mx) * (y - my);
    den += (x - mx) ** 2;
  });
  return num / den;
}
/** Flat: grows by less than 0.5 MiB per handoff over the second half. */
const flat = (s: number[]): boolean => trend(s) < 0.5;
const report = {
  handoffs: count,
  verified,
  firstHandoffSeconds: seconds[0],
  lastHandoffSeconds: seconds.at(-1),
  rssMiB: Object.fromEntries(tracked.map((t) => [t.name, { first: Number(t.samples[0]!.toFixed(1)), last: Number(t.samples.at(-1)!.toFixed(1)), max: Number(Math.max(...t.samples).toFixed(1)), trendMiBPerHandoff: Number(trend(t.samples).toFixed(2)), flat: flat(t.samples), samples: t.samples.map((x) => Number(x.toFixed(1))) }])),
};
if (values.json) console.log(JSON.stringify(report));
else {
  console.log(`${verified} of ${count} handoffs verified; handoff ${seconds[0]!.toFixed(2)} s first, ${seconds.at(-1)!.toFixed(2)} s last\n`);
  console.log(
    formatTable([
      ['process', 'RSS MiB after 1st', `after ${Math.ceil(count / 2)}th`, `after ${count}th`, 'max', 'MiB/handoff, 2nd half', 'flat'],
      ...tracked.map((t) => [
        t.name,
        t.samples[0]!.toFixed(1),
        t.samples[Math.ceil(count / 2) - 1]!.toFixed(1),
        t.samples.at(-1)!.toFixed(1),
        Math.max(...t.samples).toFixed(1),
        trend(t.samples).toFixed(2),
        flat(t.samples) ? 'yes' : 'NO',
      ]),
    ]),
  );
}
process.exit(verified === count ? 0 : 1);
