/** The `handoff` command line. */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { errorMessage } from '../shared/model/errors.js';
import type { LiveVm } from '../shared/model/migration.js';
import type { VmDescription } from '../shared/vm/qemu.js';
import type { ResumeOptions } from '../services/receiver/resume.js';
import type { StreamResumeOptions } from '../services/receiver/stream-resumer.js';
import { healthPortFromEnv, healthServerWanted, startHealthServer } from '../shared/telemetry/health.js';
import { createLogger } from '../shared/telemetry/log.js';
import { startTelemetry } from '../shared/telemetry/telemetry.js';
import { ADAPTIVE_START_MODE, DEFAULT_MODE, checkMode, parseCompression, parseDelta, type Mode } from '../shared/model/mode.js';
import { parseRateBps, parseSizeBytes } from '../shared/config/units.js';
import { ACTOR_NAMES, actorMain, type ActorName } from './actors.js';
import type { ReceiveOptions } from './receive.js';
import type { ReceivedMigration } from '../services/receiver/service.js';

const HELP: Record<string, string> = {
  main: `handoff: VM handoff between edge cloudlets over NATS JetStream

Usage:
  handoff demo      [options]   both cloudlets on this machine, generated images, progress and summary
  handoff migrate   [options]   hand a VM (images, or a running QEMU guest) off to a destination
  handoff receive   [options]   be the destination: rebuild the images, verify, exit
  handoff base      [options]   take a base snapshot of a running QEMU VM (every cloudlet holds it)
  handoff profile   [options]   measure every mode's cost and ratio: the tuner's profile
  handoff actor NAME --nats URL run one actor (${ACTOR_NAMES.join(', ')}) as a service

Run 'handoff COMMAND --help' for a command's options, 'handoff --version' for the version. Without
--nats, a command starts its own nats-server (JetStream on, a free port, a temporary store, a
generated password) and stops it when it ends.

The WAN link is TLS 1.3, authenticated at both ends; both sides read the same variables:
  HANDOFF_LINK_PSK (or HANDOFF_LINK_PSK_FILE)   a pre-shared key, 64+ hex digits (openssl rand -hex 32)
  HANDOFF_LINK_CERT, HANDOFF_LINK_KEY, HANDOFF_LINK_CA
                                                mutual TLS: PEM files (or PEM text) from one CA
  HANDOFF_LINK_INSECURE=1                       plain TCP (a trusted network only)
'handoff demo' makes a key for its run. NATS credentials: user:password in the --nats URL, or
HANDOFF_NATS_USER/HANDOFF_NATS_PASSWORD, or an nkey seed in HANDOFF_NATS_NKEY_SEED (each also as
*_FILE).`,
  migrate: `handoff migrate: hand off a VM: its image files, or a running QEMU guest (--qmp)

  --base-memory F --memory F     base memory snapshot and current memory (same size, 4 KiB pages)
  --base-disk F --disk F         base disk and current disk (same size, 4 KiB blocks)
  --to HOST:PORT                 the destination's 'handoff receive'
  --mode adaptive|none|lz4|zstd:LEVEL
                                 adaptive (default): the tuner picks delta, compressor and level as
                                 bandwidth and spare CPU change; otherwise a fixed compression
  --delta none|xor|zstd|patch    against the base: none; each page against its base page (xor, zstd);
                                 patch: each chunk's pages compressed as one with their base pages
                                 as dictionary (give --mode zstd:LEVEL). Default xor; with adaptive,
                                 where it starts (default patch at zstd:3)
  --compress-workers N           compress processes sharing one work queue (default 2)
  --dedup-instances N            dedup processes, each owning a partition of the hash space (default 1)
  --bandwidth RATE               cap the WAN rate, e.g. 10mbit (default: no cap)
  --nats URL                     use this NATS (JetStream on) instead of an embedded one (or NATS_URL)
  --external-actors              the actors run already as services on --nats: start none
  --id ID                        migration id (default: generated)
  --link-deadline SECONDS        how long a lost WAN link may take to come back before the
                                 migration fails (default 60); until then the sender reconnects
                                 and resends what the destination has not acknowledged
  --progress / --no-progress     progress bar with ETA on stderr (default: on a terminal)
  --json                         print one JSON summary object on stdout

A running VM, started however its owner starts QEMU (ordinary RAM, any devices):
  --qmp SOCKET --base DIR        its QMP socket and its base ('handoff base --out DIR', held by the
                                 destination too); no --memory/--disk: QEMU migrates its RAM into
                                 this handoff, which sends only the pages that differ from what the
                                 destination holds (the base's, then the version last sent)
  --downtime-ms N                QEMU is told to stop the VM once what it has left to send would
                                 cross in this at the pace pages were delivered so far (300)
  --max-rounds N                 rounds at most (30)
  --no-auto-converge             leave the guest unthrottled: neither QEMU's auto-converge nor, where
                                 it dirties pages faster than they are delivered, a CPU quota on its
                                 QEMU (halved each such round, 50% of a core down to 6%); such a
                                 guest may then not converge
  Before any page moves, migrate refuses, naming the difference, a VM that is not the base's
  machine (machine type, memory, cpus, devices, drives, as its command line says), a base that does
  not hold its disk, a VM with more than one disk or a qcow2 one (one raw disk, drive 0, for now),
  and a VM waiting for an incoming migration, migrated away or migrating already; capture then
  refuses, before it publishes anything, a VM whose RAM blocks are not the base's. Rounds are QEMU's passes over its dirty log; the pace
  this handoff reads the stream at is the pipeline's, so QEMU's bandwidth estimate is the link's.
  The disk's pages come from the base's dirty bitmap over NBD (read whole only where QEMU lacks
  the bitmap). Until QEMU stops the VM a failure
  cancels QEMU's migration and the VM runs on; after, the source VM is resumed unless the
  destination may run it. The summary gives the rounds, QEMU's own downtime, and how far
  auto-converge throttled the guest.

A running VM of the project's own shared-file machine:
  --qmp SOCKET                   its QMP socket; --memory is then its RAM file (memory-backend-file,
                                 share=on) and --disk its disk. Pre-copy rounds, then stop, device
                                 state, last round; the destination resumes it (receive --resume-vm);
                                 on failure the source VM runs again
  --base-device-state F          the base snapshot's device state (the final one is sent against it)
  --vm-description F             JSON {memoryBytes, cpus, append}: the machine both ends build
  --downtime-ms N                stop when the last round is predicted to fit this (default 300)
  --max-rounds N                 pre-copy rounds at most (default 5)

SIGTERM or Ctrl-C stops the handoff with its actors and nats-server and prints the summary (a
second one exits at once); a live VM already stopped for the switch is left stopped.
Exit status: 0 when the destination verified both images, 1 otherwise.`,
  receive: `handoff receive: the destination cloudlet

  --listen HOST:PORT             where the source's sender connects (port 0: any free port)
  --base-memory F --base-disk F  this cloudlet's copy of the base VM (refused if not the source's)
  --base DIR                     instead: the base folder 'handoff base' made (its memory.img and
                                 its disk)
  --out DIR                      writes DIR/memory.img and DIR/disk.img once verified
  --nats URL                     use this NATS instead of an embedded one
  --json                         print one JSON result object on stdout
  --resume-vm --kernel F --initrd F --base-device-state F
                                 accept live handoffs of running VMs: start QEMU on the images being
                                 rebuilt, load the device state once verified, run the guest on the
                                 source's go (the VM outlives this command)
  --base DIR --resume-vm [--qemu-command "ARGS"]
                                 accept live handoffs of the source's own machine (RAM from QEMU's
                                 stream): QEMU runs the source's command line with this cloudlet's
                                 paths (drive -> the disk being rebuilt; -qmp, -serial, -monitor,
                                 chardev files and sockets, -pidfile -> files in the out folder;
                                 -kernel, -initrd, -bios, -L kept: they must exist here), or ARGS
                                 (mapped the same way); fed the base's RAM at once and the rebuilt
                                 pages as they come, the device state once verified. A source whose
                                 machine or RAM blocks differ is refused, each difference named
  --serve                        keep receiving migrations until SIGTERM, each into DIR/<migrationId>/
                                 (one result line each; with --json one JSON object per line); a base
                                 not there yet is waited for, its missing files said every 30 s
The link's credentials come from HANDOFF_LINK_PSK or HANDOFF_LINK_CERT/KEY/CA (see 'handoff --help');
a source without them is refused before any page moves.
Exit status: 0 when the rebuilt images match the source's hashes, 1 otherwise.`,
  profile: `handoff profile: measure each mode's CPU cost per block and output ratio

Generates a workload (a realistic VM), runs the real delta and compress cores on its dedup output
for every mode, and writes the profile the adaptive tuner starts from (HANDOFF_PROFILE=FILE makes
the tuner use another one; 'npm run profile' regenerates the shipped default).

  --out FILE                     where to write it (default: print to stdout)
  --memory-size SIZE             workload memory size (default 64MiB)
  --disk-size SIZE               workload disk size (default 64MiB)`,
  demo: `handoff demo: a complete handoff on this machine

Generates a realistic VM (base and current memory and disk), starts a destination cloudlet
(its own nats-server and receiver) and a source cloudlet (its own nats-server and actors),
hands the VM off over a rate-capped link with a progress bar, and prints a summary table.

  --memory-size SIZE             memory image size (default 256MiB)
  --disk-size SIZE               disk image size (default 256MiB)
  --bandwidth RATE               WAN rate cap (default 50mbit)
  --mode, --delta, --compress-workers, --dedup-instances   as for migrate
  --dir DIR                      keep the images here (default: a temporary folder, removed after)
  --json                         print one JSON summary object on stdout`,
};

const migrateFlags = {
  mode: { type: 'string' },
  delta: { type: 'string' },
  'compress-workers': { type: 'string' },
  'dedup-instances': { type: 'string' },
  bandwidth: { type: 'string' },
  nats: { type: 'string' },
  json: { type: 'boolean' },
  progress: { type: 'boolean' },
  'no-progress': { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const satisfies ParseArgsConfig['options'];

function positiveInt(text: string | undefined, name: string, fallback: number): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`--${name} must be a whole number of at least 1, not ${JSON.stringify(text)}`);
  return n;
}

class UsageError extends Error {}

function need(values: Record<string, unknown>, names: string[], command: string): void {
  const missing = names.filter((n) => typeof values[n] !== 'string');
  if (missing.length) throw new UsageError(`${command}: missing ${missing.map((n) => `--${n}`).join(', ')} (see 'handoff ${command} --help')`);
}

/** `--mode adaptive` (the default) starts from patch-3 (or `--delta` at zstd-3) and lets the tuner choose. */
export function modeFrom(values: { mode?: string; delta?: string }): { mode: Mode; adaptive: boolean } {
  const adaptive = values.mode === undefined || values.mode === 'adaptive';
  const start = adaptive ? ADAPTIVE_START_MODE : DEFAULT_MODE;
  const compression = adaptive ? start : parseCompression(values.mode!);
  const delta = values.delta === undefined ? start.delta : parseDelta(values.delta);
  return { mode: checkMode({ delta, compressor: compression.compressor, level: compression.level }), adaptive };
}

function readVmDescription(file: string): VmDescription {
  let v: Partial<VmDescription>;
  try {
    v = JSON.parse(readFileSync(file, 'utf8')) as Partial<VmDescription>;
  } catch (err) {
    throw new UsageError(`--vm-description ${file}: ${errorMessage(err)}`);
  }
  if (!Number.isInteger(v.memoryBytes) || !Number.isInteger(v.cpus) || typeof v.append !== 'string') throw new UsageError(`--vm-description ${file}: needs memoryBytes, cpus and append`);
  return { memoryBytes: v.memoryBytes!, cpus: v.cpus!, append: v.append };
}

function liveFrom(values: Record<string, string | boolean | undefined>): LiveVm {
  need(values, ['base-device-state', 'vm-description'], 'migrate');
  return {
    qmpSocket: values.qmp as string,
    baseDeviceState: values['base-device-state'] as string,
    vm: readVmDescription(values['vm-description'] as string),
    downtimeMs: positiveInt(values['downtime-ms'] as string | undefined, 'downtime-ms', 300),
    maxRounds: positiveInt(values['max-rounds'] as string | undefined, 'max-rounds', 5),
  };
}

function resumeFrom(values: Record<string, string | boolean | undefined>): ResumeOptions {
  need(values, ['kernel', 'initrd', 'base-device-state'], 'receive');
  return { kernel: values.kernel as string, initrd: values.initrd as string, baseDeviceState: values['base-device-state'] as string };
}

/** `receive --base DIR`: the base folder's memory image and disk, and what resuming from the stream needs. */
async function baseFolderFrom(values: Record<string, string | boolean | undefined>): Promise<{ baseMemory: string; baseDisk: string; stream: StreamResumeOptions }> {
  if (values['base-memory'] || values['base-disk']) throw new UsageError('receive: --base DIR gives the base memory and disk; leave out --base-memory and --base-disk');
  if (values.kernel || values.initrd || values['base-device-state']) throw new UsageError("receive: --kernel, --initrd and --base-device-state are for a shared-file VM; with --base the VM is the source's own machine");
  const [{ readBase }, { splitCommandLine }] = await Promise.all([import('../shared/vm/base-manifest.js'), import('../services/receiver/stream-resume.js')]);
  const base = await readBase(values.base as string);
  const disk = base.diskPaths[0];
  if (!disk) throw new UsageError(`receive: the base ${base.dir} has no disk: a handoff carries one`);
  let qemuCommand: string[] | undefined;
  if (values['qemu-command'] !== undefined) {
    try {
      qemuCommand = splitCommandLine(values['qemu-command'] as string);
    } catch (err) {
      throw new UsageError(`receive: --qemu-command: ${errorMessage(err)}`);
    }
    if (qemuCommand.length === 0) throw new UsageError('receive: --qemu-command is empty');
  }
  return { baseMemory: base.memoryPath, baseDisk: disk, stream: { base, ...(qemuCommand ? { qemuCommand } : {}) } };
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    console.log(HELP.main);
    return command ? 0 : 2;
  }
  if (command === '--version' || command === '-V') {
    const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
    console.log(`handoff ${pkg.version} (Node.js ${process.versions.node})`);
    return 0;
  }
  switch (command) {
    case 'migrate': {
      const { values } = parseArgs({
        args: rest,
        options: {
          ...migrateFlags,
          'base-memory': { type: 'string' },
          memory: { type: 'string' },
          'base-disk': { type: 'string' },
          disk: { type: 'string' },
          to: { type: 'string' },
          'external-actors': { type: 'boolean' },
          id: { type: 'string' },
          'link-deadline': { type: 'string' },
          qmp: { type: 'string' },
          'base-device-state': { type: 'string' },
          'vm-description': { type: 'string' },
          'downtime-ms': { type: 'string' },
          'max-rounds': { type: 'string' },
          base: { type: 'string' },
          'no-auto-converge': { type: 'boolean' },
        },
      });
      if (values.help) return console.log(HELP.migrate), 0;
      const streamMode = values.base !== undefined;
      if (streamMode) {
        need(values, ['qmp', 'to'], 'migrate');
        const given = (['base-memory', 'memory', 'base-disk', 'disk', 'base-device-state', 'vm-description'] as const).filter((n) => values[n] !== undefined);
        if (given.length) throw new UsageError(`migrate: --base takes the images from the base and QEMU: not ${given.map((n) => `--${n}`).join(', ')}`);
      } else {
        need(values, ['base-memory', 'memory', 'base-disk', 'disk', 'to'], 'migrate');
        if (values['no-auto-converge']) throw new UsageError('migrate: --no-auto-converge is for a VM handed off with --qmp and --base');
      }
      if (values['external-actors'] && !(values.nats ?? process.env.NATS_URL)) throw new UsageError('migrate: --external-actors needs --nats (where the actors run)');
      // SIGTERM or Ctrl-C: the handoff stops with its actors and nats-server (killed outright, its
      // actors stop on their own but the nats-server would run on); a second one exits at once
      const stop = new AbortController();
      const onSignal = (signal: NodeJS.Signals): void => {
        if (stop.signal.aborted) process.exit(128 + (signal === 'SIGINT' ? 2 : 15));
        stop.abort();
      };
      process.on('SIGTERM', onSignal);
      process.on('SIGINT', onSignal);
      // each command loads what it runs: an actor process (seven start on the source's cores for a
      // spawned handoff) skips the command's, the receiver's and the tuner's modules
      const [{ migrate, prepareStreamHandoff }, { formatSummary }] = await Promise.all([import('./migrate.js'), import('./summary.js')]);
      const stream = streamMode
        ? await prepareStreamHandoff({
            qmpSocket: values.qmp!,
            baseDir: values.base!,
            downtimeMs: positiveInt(values['downtime-ms'], 'downtime-ms', 300),
            maxRounds: positiveInt(values['max-rounds'], 'max-rounds', 30),
            autoConverge: !values['no-auto-converge'],
          })
        : undefined;
      const summary = await migrate({
        stop: stop.signal,
        baseMemory: stream?.baseMemory ?? values['base-memory']!,
        memory: stream ? '' : values.memory!,
        baseDisk: stream?.baseDisk ?? values['base-disk']!,
        disk: stream?.disk ?? values.disk!,
        to: values.to!,
        ...modeFrom(values),
        compressWorkers: positiveInt(values['compress-workers'], 'compress-workers', 2),
        dedupInstances: positiveInt(values['dedup-instances'], 'dedup-instances', 1),
        bandwidthCapBps: values.bandwidth ? parseRateBps(values.bandwidth) : 0,
        ...((values.nats ?? process.env.NATS_URL) ? { natsUrl: (values.nats ?? process.env.NATS_URL)! } : {}),
        ...(values.id ? { migrationId: values.id } : {}),
        ...(values['link-deadline'] ? { linkDeadlineMs: positiveInt(values['link-deadline'], 'link-deadline', 60) * 1000 } : {}),
        ...(stream ? { live: stream.live } : values.qmp ? { live: liveFrom(values) } : {}),
        spawnActors: !values['external-actors'],
        progress: values['no-progress'] ? false : (values.progress ?? Boolean(process.stderr.isTTY)),
      });
      if (values.json) console.log(JSON.stringify(summary));
      else console.log(formatSummary(summary));
      return summary.verified ? 0 : 1;
    }
    case 'receive': {
      const { values } = parseArgs({
        args: rest,
        options: {
          listen: { type: 'string' },
          'base-memory': { type: 'string' },
          'base-disk': { type: 'string' },
          out: { type: 'string' },
          nats: { type: 'string' },
          json: { type: 'boolean' },
          serve: { type: 'boolean' },
          'resume-vm': { type: 'boolean' },
          kernel: { type: 'string' },
          initrd: { type: 'string' },
          'base-device-state': { type: 'string' },
          base: { type: 'string' },
          'qemu-command': { type: 'string' },
          help: { type: 'boolean', short: 'h' },
        },
      });
      if (values.help) return console.log(HELP.receive), 0;
      if (values.serve) {
        // a service started before its base is in place waits for it rather than exiting
        const [{ waitForBase }, { BASE_MANIFEST_FILE }] = await Promise.all([import('./receive.js'), import('../shared/vm/base-manifest.js')]);
        const basePaths = values.base ? [join(values.base, BASE_MANIFEST_FILE)] : [values['base-memory'], values['base-disk']].filter((p): p is string => p !== undefined);
        await waitForBase(basePaths, createLogger({ stage: 'receiver' }));
      }
      const folder = values.base ? await baseFolderFrom(values) : undefined;
      if (!folder) need(values, ['listen', 'base-memory', 'base-disk', 'out'], 'receive');
      else need(values, ['listen', 'out'], 'receive');
      if (values['qemu-command'] !== undefined && !(folder && values['resume-vm'])) throw new UsageError('receive: --qemu-command needs --base DIR --resume-vm');
      const receiveOptions: ReceiveOptions & { onListening: NonNullable<ReceiveOptions['onListening']> } = {
        listen: values.listen!,
        baseMemory: folder?.baseMemory ?? values['base-memory']!,
        baseDisk: folder?.baseDisk ?? values['base-disk']!,
        outDir: values.out!,
        ...((values.nats ?? process.env.NATS_URL) ? { natsUrl: (values.nats ?? process.env.NATS_URL)! } : {}),
        onListening: (a) => void process.stderr.write(`receiver listening on ${a.host}:${a.port}\n`),
        ...(values['resume-vm'] ? (folder ? { stream: folder.stream } : { vm: resumeFrom(values) }) : {}),
      };
      if (values.serve) {
        // a serving receiver is a long-running service: health, readiness and metrics like an actor's
        let listening = false;
        const port = healthPortFromEnv();
        const health = port === undefined ? undefined : await startHealthServer(port, { ready: () => listening && !stop.signal.aborted }, telemetry, createLogger({ stage: 'receiver' }));
        const onListening = receiveOptions.onListening;
        receiveOptions.onListening = (a) => {
          listening = true;
          onListening(a);
        };
        const stop = new AbortController();
        process.once('SIGTERM', () => stop.abort());
        process.once('SIGINT', () => stop.abort());
        const describe = (r: ReceivedMigration): string => `migration ${r.migrationId}: ${r.result.verified ? `verified, ${r.memoryPath} and ${r.diskPath} written` : `FAILED: ${r.result.reason}`}`;
        const { serveReceiver } = await import('./receive.js');
        await serveReceiver(receiveOptions, (r) => console.log(values.json ? JSON.stringify(r) : describe(r)), stop.signal);
        health?.close();
        return 0;
      }
      const { receiveOnce } = await import('./receive.js');
      const received = await receiveOnce(receiveOptions);
      if (values.json) console.log(JSON.stringify(received));
      else console.log(`migration ${received.migrationId}: ${received.result.verified ? `verified, ${received.memoryPath} and ${received.diskPath} written` : `FAILED: ${received.result.reason}`}`);
      return received.result.verified ? 0 : 1;
    }
    case 'demo': {
      const { values } = parseArgs({
        args: rest,
        options: { ...migrateFlags, 'memory-size': { type: 'string' }, 'disk-size': { type: 'string' }, dir: { type: 'string' } },
      });
      if (values.help) return console.log(HELP.demo), 0;
      const { demo } = await import('./demo.js');
      return demo({
        memorySize: values['memory-size'] ?? '256MiB',
        diskSize: values['disk-size'] ?? '256MiB',
        bandwidth: values.bandwidth ?? '50mbit',
        ...modeFrom(values),
        compressWorkers: positiveInt(values['compress-workers'], 'compress-workers', 2),
        dedupInstances: positiveInt(values['dedup-instances'], 'dedup-instances', 1),
        json: values.json ?? false,
        ...(values.dir ? { dir: values.dir } : {}),
      });
    }
    case 'profile': {
      const { values } = parseArgs({
        args: rest,
        options: { out: { type: 'string' }, 'memory-size': { type: 'string' }, 'disk-size': { type: 'string' }, help: { type: 'boolean', short: 'h' } },
      });
      if (values.help) return console.log(HELP.profile), 0;
      const { profileGenerated } = await import('./profile.js');
      const profile = await profileGenerated(parseSizeBytes(values['memory-size'] ?? '64MiB'), parseSizeBytes(values['disk-size'] ?? '64MiB'));
      const text = `${JSON.stringify(profile, null, 1)}\n`;
      if (values.out) {
        const { writeFile } = await import('node:fs/promises');
        await writeFile(values.out, text);
        process.stderr.write(`profile of ${profile.modes.length} modes written to ${values.out}\n`);
      } else process.stdout.write(text);
      return 0;
    }
    case 'base':
      return (await import('./base.js')).baseMain(rest);
    case 'actor': {
      const { values, positionals } = parseArgs({
        args: rest,
        allowPositionals: true,
        options: { nats: { type: 'string' }, partition: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
      });
      const name = positionals[0] as ActorName | undefined;
      if (values.help || !name) return console.log(HELP.main), values.help ? 0 : 2;
      if (!(ACTOR_NAMES as readonly string[]).includes(name)) throw new UsageError(`unknown actor ${JSON.stringify(name)}: one of ${ACTOR_NAMES.join(', ')}`);
      const natsUrl = values.nats ?? process.env.NATS_URL;
      if (!natsUrl) throw new UsageError('actor: --nats URL (or NATS_URL) is required');
      const partition = values.partition === undefined ? 0 : Number(values.partition);
      await actorMain(name, natsUrl, partition);
      return 0;
    }
    default:
      throw new UsageError(`unknown command ${JSON.stringify(command)}: see 'handoff --help'`);
  }
}

// each process is one service in the trace: the actor's name, or the command's role
const argv = process.argv.slice(2);
const ROLES: Record<string, string> = { migrate: 'control', receive: 'receiver' };
// metrics are kept only where a health server will serve them
const telemetry = await startTelemetry(argv[0] === 'actor' ? (argv[1] ?? 'actor') : (ROLES[argv[0] ?? ''] ?? argv[0] ?? 'cli'), { metrics: healthServerWanted() });
main(argv).then(
  async (code) => {
    await telemetry.shutdown();
    process.exit(code);
  },
  async (err: unknown) => {
    process.stderr.write(`handoff: ${errorMessage(err)}\n`);
    await telemetry.shutdown();
    process.exit(err instanceof UsageError || (err instanceof Error && 'code' in err && String(err.code).startsWith('ERR_PARSE_ARGS')) ? 2 : 1);
  },
);
