/**
 * The deployment for real: Debian's Docker engine started by the test (its own dockerd, inside a
 * network namespace), every image built by infra/build-images.sh from Debian's and npm's packages
 * alone, two cloudlets and a worker host brought up from the compose files with Debian's
 * docker-compose 1.29, and one handoff between the cloudlets with the worker host's compress workers
 * in use: verified byte-identical, and traced into the test's own OTLP receiver.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { MigrationSummary } from '../cli/summary.js';
import { generateImageSet } from '../shared/testdata/images.js';
import { DOCKER, DOCKER_COMPOSE, engineUnavailable, installEngine, startEngine, type DockerEngine } from './helpers/docker-engine.js';
import { startOtlpReceiver, type OtlpReceiver } from './helpers/otlp-receiver.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const INFRA = join(ROOT, 'infra');
const WAN_RATE_BPS = 20e6;
const ACTOR_SERVICES = ['handoff-control', 'handoff-capture', 'handoff-dedup', 'handoff-delta', 'handoff-compress', 'handoff-sender', 'handoff-tuner', 'handoff-receiver'];

interface Project {
  name: string;
  file: string;
  envFile: string;
}

/** Runs a command to its end without blocking the test's timers; throws with its output's tail when it fails. */
function run(cmd: string, args: string[], env: NodeJS.ProcessEnv, cwd = INFRA, okCodes = [0]): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env, cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      if (okCodes.includes(code ?? -1)) resolve({ stdout, stderr });
      else reject(new Error(`${cmd} ${args.join(' ')} exited ${code}:\n${(stderr || stdout).trim().split('\n').slice(-15).join('\n')}`));
    });
  });
}

const sha256 = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex');

const reason = engineUnavailable();

describe('containers: two cloudlets and a worker host on a Docker engine of the test\'s own', { skip: reason ?? false, timeout: 1_200_000 }, () => {
  let dir = '';
  const steps: [string, number][] = [];
  let engine: DockerEngine | undefined;
  let engineError: string | undefined;
  let otlp: OtlpReceiver;
  let images: Awaited<ReturnType<typeof generateImageSet>>;
  const projects: Project[] = [];
  const timed = async <T>(name: string, work: () => Promise<T>): Promise<T> => {
    const t0 = performance.now();
    try {
      return await work();
    } finally {
      steps.push([name, (performance.now() - t0) / 1000]);
    }
  };
  const compose = (p: Project, args: string[], okCodes = [0]): Promise<{ stdout: string; stderr: string }> =>
    run(DOCKER_COMPOSE, ['-p', p.name, '-f', p.file, '--env-file', p.envFile, ...args], engine!.env, INFRA, okCodes);
  const needEngine = (t: { skip(message?: string): void }): DockerEngine | undefined => {
    if (!engine) t.skip(`no engine: ${engineError}`);
    return engine;
  };

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'handoff-containers-'));
    await timed('install the engine (apt-get, when missing)', async () => installEngine());
    try {
      engine = await timed('start dockerd in a network namespace', () => startEngine(join(dir, 'engine')));
    } catch (err) {
      // a machine where no engine can start (no cgroups, no overlay file system, a container)
      engineError = (err as Error).message;
      return;
    }
    otlp = await startOtlpReceiver(engine.hostAddress);
    images = await generateImageSet({ dir: join(dir, 'images'), memoryBytes: 32 << 20, diskBytes: 32 << 20, seed: 33 });
  });

  after(async () => {
    for (const p of projects.reverse()) await compose(p, ['down', '-v', '--timeout', '5']).catch(() => undefined);
    if (engine) await timed('stop everything', () => engine!.stop());
    otlp?.server.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
    console.log(`# containers test, the time of each step:\n${steps.map(([n, s]) => `#   ${n}: ${s.toFixed(1)} s`).join('\n')}`);
  });

  test('every image builds from Debian\'s and npm\'s packages alone (infra/build-images.sh)', async (t) => {
    const e = needEngine(t);
    if (!e) return;
    const { stdout, stderr } = await timed('build the images', () => run(join(INFRA, 'build-images.sh'), [], e.env, ROOT));
    t.diagnostic(stderr.trim());
    assert.match(stdout, /^HANDOFF_IMAGE=cloudlet-handoff:latest$/m);
    assert.match(stdout, /^NATS_IMAGE=cloudlet-handoff\/nats:bookworm$/m);
    // the proxy lets only Debian's and npm's registries through; where the host does not forward the
    // namespace's packets (ip_forward 0, as on the machines here) it is the builds' only way out. A
    // data-root kept from an earlier run holds every layer, and nothing is fetched.
    if (!process.env.HANDOFF_DOCKER_DATA_ROOT) assert.ok(e.proxy.targets.some((h) => h.startsWith('registry.npmjs.org')), 'the build fetched nothing from npm');
    const forwarding = readFileSync('/proc/sys/net/ipv4/ip_forward', 'utf8').trim() === '1';
    t.diagnostic(`fetched from ${[...new Set(e.proxy.targets)].join(', ')}; refused ${[...new Set(e.proxy.refused)].join(', ') || 'none'}; host forwarding ${forwarding ? 'on' : 'off'}`);
    const version = e.docker(['run', '--rm', 'cloudlet-handoff:latest', '--version']).trim();
    assert.match(version, /\d+\.\d+\.\d+/);
  });

  test('a handoff between two cloudlets with a worker host\'s compress workers: verified, and one trace', async (t) => {
    const e = needEngine(t);
    if (!e) return;
    assert.ok(e.docker(['image', 'ls', '-q', 'cloudlet-handoff:latest']).trim(), 'no image: the build test failed');
    const psk = join(dir, 'link-psk');
    writeFileSync(psk, createHash('sha256').update(dir).digest('hex'));
    const common = [
      'HANDOFF_IMAGE=cloudlet-handoff:latest',
      'NATS_IMAGE=cloudlet-handoff/nats:bookworm',
      `LINK_PSK_FILE=${psk}`,
      `OTEL_EXPORTER_OTLP_ENDPOINT=${otlp.url}`,
      'OTEL_EXPORTER_OTLP_PROTOCOL=http/json',
    ];
    const project = (name: string, file: string, settings: string[]): Project => {
      const envFile = join(dir, `${name}.env`);
      writeFileSync(envFile, [...settings, ...common].join('\n') + '\n');
      const p = { name, file, envFile };
      projects.push(p);
      return p;
    };
    const a = project('cloudlet-a', 'compose.yml', ['CLOUDLET=a', 'NATS_PASSWORD=pw-a', 'NATS_LEAF_PASSWORD=leaf-a', 'NATS_LEAF_PORT=7422', 'RECEIVER_PORT=7300']);
    const b = project('cloudlet-b', 'compose.yml', ['CLOUDLET=b', 'NATS_PASSWORD=pw-b', 'NATS_LEAF_PASSWORD=leaf-b', 'NATS_LEAF_PORT=7423', 'RECEIVER_PORT=7301']);
    // another host of cloudlet A: its leaf node joins A's server at the published leaf port
    const w = project('worker-host-a', 'compose.worker-host.yml', ['NATS_PASSWORD=pw-a', `NATS_LEAF_URL=nats-leaf://leaf:leaf-a@${e.nsAddress}:7422`]);

    await timed('bring up two cloudlets and a worker host', async () => {
      // the WAN between the cloudlets, external to both projects (a kept data-root may hold it)
      if (e.docker(['network', 'ls', '-q', '--filter', 'name=^handoff-wan$']).trim() === '') e.docker(['network', 'create', 'handoff-wan']);
      await compose(a, ['up', '-d', '--scale', 'compress=1']);
      await compose(b, ['up', '-d']);
      await compose(w, ['up', '-d', '--scale', 'compress=1']);
    });
    // a WAN the tuner compresses for (unshaped, the bridge carries gigabits and it sends raw)
    const shaped = e.shapeNetwork('handoff-wan', WAN_RATE_BPS);
    assert.ok(shaped.length >= 4, `the WAN bridge has ports ${shaped.join(', ')}`);

    // containers found as the README finds them (1.29 names them cloudlet-b_receiver_1, v2 cloudlet-b-receiver-1)
    const containerOf = async (p: Project, service: string): Promise<string> => (await compose(p, ['ps', '-q', service])).stdout.trim();
    const receiverB = await containerOf(b, 'receiver');
    const captureA = await containerOf(a, 'capture');
    assert.match(receiverB, /^[0-9a-f]{12,}$/);
    // B's receiver waits for its base, naming what it waits for, instead of exiting
    let waitLog = '';
    for (let i = 0; i < 60 && !/waiting for the base/.test(waitLog); i++) {
      await sleep(500);
      const logs = await run(DOCKER, ['logs', receiverB], e.env);
      waitLog = logs.stdout + logs.stderr;
    }
    assert.match(waitLog, /waiting for the base.*\/var\/lib\/handoff\/base\/memory\.img/);

    await timed('put the images into the volumes (docker cp, owned by root)', async () => {
      const base = join(dir, 'base');
      const vm = join(dir, 'vm');
      mkdirSync(base);
      mkdirSync(vm);
      for (const [from, to] of [[images.baseMemory, join(base, 'memory.img')], [images.baseDisk, join(base, 'disk.img')], [images.memory, join(vm, 'memory.img')], [images.disk, join(vm, 'disk.img')]] as const) {
        writeFileSync(to, readFileSync(from));
      }
      e.docker(['cp', base, `${receiverB}:/var/lib/handoff/base`]);
      e.docker(['cp', base, `${captureA}:/var/lib/handoff/base`]);
      e.docker(['cp', vm, `${captureA}:/var/lib/handoff/vm`]);
    });

    await timed('wait until every container is healthy', async () => {
      let unhealthy: string[] = [];
      for (let i = 0; i < 120; i++) {
        const states = e.docker(['ps', '--format', '{{.Names}} {{.Status}}']).trim().split('\n');
        unhealthy = states.filter((s) => /health: starting|unhealthy|Restarting/.test(s));
        if (unhealthy.length === 0 && states.length >= 2 * 8 + 2) return;
        await sleep(500);
      }
      assert.fail(`not healthy: ${unhealthy.join('; ')}`);
    });

    /** one handoff from A to B: verified, and the rebuilt files in B's volume byte-identical to A's images */
    const handOff = async (what: string, modeArgs: string[]): Promise<{ summary: MigrationSummary; traceId: string }> => {
      const rootsBefore = new Set(otlp.spans.filter((s) => s.parentSpanId === '').map((s) => s.traceId));
      // exit 1 with a summary is a failed handoff: its reason is asserted on below
      const { stdout, stderr } = await timed(`hand off from A to B (${what})`, () => compose(a, ['run', '--rm', '-T', 'control', 'migrate', '--external-actors', '--json', ...modeArgs,
        '--base-memory', '/var/lib/handoff/base/memory.img', '--memory', '/var/lib/handoff/vm/memory.img',
        '--base-disk', '/var/lib/handoff/base/disk.img', '--disk', '/var/lib/handoff/vm/disk.img', '--to', 'cloudlet-b-receiver:7300'], [0, 1]));
      let summary: MigrationSummary;
      try {
        summary = JSON.parse(stdout) as MigrationSummary;
      } catch {
        assert.fail(`migrate printed no summary:\n${stdout}\n${stderr.trim().split('\n').slice(-15).join('\n')}`);
      }
      assert.equal(summary.verified, true, summary.reason);
      t.diagnostic(`${what}: ${summary.handoffSeconds.toFixed(1)} s, ${summary.wireBytes} wire bytes, ${(summary.measuredBandwidthBps / 1e6).toFixed(1)} Mbit/s measured, chunks by mode ${JSON.stringify(summary.chunksByMode)}`);
      const out = join(dir, `rebuilt-${summary.migrationId}`);
      e.docker(['cp', `${receiverB}:/var/lib/handoff/incoming/${summary.migrationId}`, out]);
      assert.equal(sha256(join(out, 'memory.img')), sha256(images.memory));
      assert.equal(sha256(join(out, 'disk.img')), sha256(images.disk));
      // the control process exported its root span as it exited
      const root = otlp.spans.find((s) => s.service === 'handoff-control' && s.parentSpanId === '' && !rootsBefore.has(s.traceId));
      assert.ok(root, `no root span of ${summary.migrationId}`);
      return { summary, traceId: root.traceId };
    };
    /** waits for spans of every one of `services` under the trace (the actors export in batches) */
    const spansOf = async (traceId: string, services: string[]): Promise<void> => {
      let missing = services;
      for (let i = 0; i < 60 && missing.length > 0; i++) {
        const present = new Set(otlp.spans.filter((s) => s.traceId === traceId).map((s) => s.service));
        missing = services.filter((s) => !present.has(s));
        if (missing.length > 0) await sleep(1000);
      }
      assert.deepEqual(missing, [], `no spans under trace ${traceId} from ${missing.join(', ')}`);
      t.diagnostic(`${otlp.spans.filter((s) => s.traceId === traceId).length} spans under trace ${traceId}`);
    };

    // a fixed mode whose compression is the compress stage's (patch, the tuner's start, is delta's own)
    const fixed = await handOff('fixed zstd:3', ['--mode', 'zstd:3']);
    // the worker host's compress workers took chunks (instances are host:pid, the host its container's)
    const workerHost = e.docker(['inspect', '--format', '{{.Config.Hostname}}', await containerOf(w, 'compress')]).trim();
    const perInstance = fixed.summary.stages.compress?.perInstance ?? {};
    t.diagnostic(`compress chunks per instance: ${JSON.stringify(perInstance)} (worker host: ${workerHost})`);
    const onWorkerHost = Object.entries(perInstance).filter(([instance]) => instance.startsWith(`${workerHost}:`)).reduce((n, [, c]) => n + c, 0);
    assert.ok(onWorkerHost > 0, `the worker host compressed nothing: ${JSON.stringify(perInstance)}`);
    // one trace with spans of every actor that took part: both cloudlets and the worker host
    await timed('wait for the spans', () => spansOf(fixed.traceId, ACTOR_SERVICES.filter((s) => s !== 'handoff-tuner')));

    // adaptive (the default): the tuner's decisions are spans of the same trace
    const adaptive = await handOff('adaptive', []);
    assert.ok(adaptive.summary.decisions.length > 0, 'the tuner decided nothing');
    await timed('wait for the spans', () => spansOf(adaptive.traceId, ['handoff-control', 'handoff-capture', 'handoff-dedup', 'handoff-sender', 'handoff-tuner', 'handoff-receiver']));
    assert.ok(otlp.spans.some((s) => s.traceId === adaptive.traceId && s.name === 'tuner decision'));
  });

  test('nothing is left running', async (t) => {
    const e = needEngine(t);
    if (!e) return;
    for (const p of projects.reverse()) await compose(p, ['down', '-v', '--timeout', '5']);
    projects.length = 0;
    assert.equal(e.docker(['ps', '-aq']).trim(), '');
    await timed('stop everything', () => e.stop());
    engine = undefined;
    assert.equal(existsSync(join(dir, 'engine')), false);
    // no dockerd, containerd or docker-proxy of this engine (each names its folder or socket)
    const ours = readdirSync('/proc').filter((pid) => /^\d+$/.test(pid)).filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(dir);
      } catch {
        return false;
      }
    });
    assert.deepEqual(ours, []);
  });
});
