/** `handoff receive`: the destination cloudlet for one migration; exits 0 when the images are verified. */
import { spawn, type ChildProcess } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { ensureLocalLinkKey } from '../shared/wire/link-security.js';
import { startEmbeddedNats, type EmbeddedNats } from '../shared/bus/nats-server.js';
import { startReceiver, type ReceivedMigration, type RunningReceiver } from '../services/receiver/service.js';
import type { ResumeOptions } from '../services/receiver/resume.js';
import type { StreamResumeOptions } from '../services/receiver/stream-resumer.js';
import type { Logger } from '../shared/telemetry/log.js';

export interface ReceiveOptions {
  listen: string;
  baseMemory: string;
  baseDisk: string;
  outDir: string;
  natsUrl?: string;
  /** live handoffs: resume VMs here */
  vm?: ResumeOptions;
  /** live handoffs of the source's own machine (RAM from QEMU's stream): resume it here */
  stream?: StreamResumeOptions;
  /** called once listening, with the bound address (port 0 picks one) */
  onListening?: (address: { host: string; port: number }) => void;
}

export async function receiveOnce(options: ReceiveOptions): Promise<ReceivedMigration> {
  let nats: EmbeddedNats | undefined;
  let receiver: RunningReceiver | undefined;
  try {
    if (!options.natsUrl) nats = await startEmbeddedNats();
    receiver = await startReceiver({ ...options, natsUrl: options.natsUrl ?? nats!.url });
    options.onListening?.(receiver.address);
    return await receiver.next();
  } finally {
    await receiver?.stop();
    await nats?.stop();
  }
}

/**
 * A serving receiver's base, put in place after the receiver starts (a container's volume filled
 * later): waits while any of `paths` does not exist, saying which at once and then every
 * `sayEveryMs`. Files that appeared while it waited are taken once their sizes and times held for a
 * poll: a copy still under way (`docker cp` creates a file before it writes it) would otherwise be
 * indexed half written. Any other problem with them (unreadable, truncated) is left to the base's
 * own checks.
 */
export async function waitForBase(paths: string[], log: Logger, pollMs = 1000, sayEveryMs = 30_000): Promise<void> {
  let saidAtMs: number | undefined;
  let lastLook: string | undefined;
  for (;;) {
    const missing: string[] = [];
    const look: string[] = [];
    for (const path of paths) {
      await stat(path).then((s) => look.push(`${s.size}:${s.mtimeMs}`), (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') missing.push(path);
      });
    }
    if (missing.length === 0) {
      if (saidAtMs === undefined) return;
      const thisLook = look.join(',');
      if (thisLook === lastLook) {
        log.info('base found', { paths: paths.join(',') });
        return;
      }
      lastLook = thisLook;
      await sleep(pollMs);
      continue;
    }
    if (saidAtMs === undefined || performance.now() - saidAtMs >= sayEveryMs) {
      log.warn('waiting for the base: not there yet', { missing: missing.join(',') });
      saidAtMs = performance.now();
    }
    await sleep(pollMs);
  }
}

/**
 * `handoff receive --serve`: a destination cloudlet's long-running receiver. Each migration's images
 * go to OUT/<migrationId>/; `onResult` sees each outcome; runs until `signal` aborts.
 */
export async function serveReceiver(options: ReceiveOptions, onResult: (r: ReceivedMigration) => void, signal: AbortSignal): Promise<void> {
  let nats: EmbeddedNats | undefined;
  let receiver: RunningReceiver | undefined;
  try {
    if (!options.natsUrl) nats = await startEmbeddedNats();
    receiver = await startReceiver({ ...options, natsUrl: options.natsUrl ?? nats!.url, perMigrationDirs: true });
    options.onListening?.(receiver.address);
    const stopped = new Promise<void>((resolve) => signal.addEventListener('abort', () => resolve(), { once: true }));
    for (;;) {
      const r = await Promise.race([receiver.next(), stopped]);
      if (!r) break;
      onResult(r);
    }
  } finally {
    await receiver?.stop();
    await nats?.stop();
  }
}

export interface ReceiverProcess {
  child: ChildProcess;
  /** HOST:PORT it listens on */
  address: string;
  /** exit code and the JSON result it printed */
  exited: Promise<{ code: number; result: ReceivedMigration | undefined }>;
  /** the last lines it logged (unless forwarded): what a run that went wrong shows of the destination */
  logTail(): string;
  /** resolves when it logs a line matching `pattern` from now on (not when forwarded; info lines need HANDOFF_LOG_LEVEL=info) */
  waitForLog(pattern: RegExp): Promise<void>;
}

export interface ReceiverProcessOptions {
  /** the base images (`--base-memory`, `--base-disk`), unless `base` gives them */
  baseMemory?: string;
  baseDisk?: string;
  /** a base folder made by `handoff base` (`--base`) */
  base?: string;
  outDir: string;
  /** default 127.0.0.1:0 (any free port) */
  listen?: string;
  /** its logs to our stderr once it listens */
  forwardLogs?: boolean;
  /** a command the receiver runs under, e.g. ['ip', 'netns', 'exec', NS] for another host */
  prefix?: string[];
  /** keep receiving migrations (`receive --serve`), one JSON line each on stdout */
  serve?: boolean;
  /** live handoffs: resume VMs here (`--resume-vm`) */
  vm?: ResumeOptions;
  /** with `base`: resume the source's own machine here (`--resume-vm`), maybe on the operator's command line (`--qemu-command`) */
  stream?: { qemuCommand?: string };
  /** extra environment for it */
  env?: NodeJS.ProcessEnv;
  /** in a process group of its own, which a test can kill whole (not on Ctrl-C with ours, though) */
  ownProcessGroup?: boolean;
}

const TAIL_CHARS = 8192;

/**
 * `handoff receive --json` in its own process (own nats-server), as a destination cloudlet runs it.
 * Both ends run from here: without configured link credentials, a fresh key is made for this run
 * (into our environment, which the source's actors inherit).
 */
export async function spawnReceiverProcess(o: ReceiverProcessOptions): Promise<ReceiverProcess> {
  ensureLocalLinkKey();
  const main = fileURLToPath(new URL('./main.js', import.meta.url));
  const bases = o.base ? ['--base', o.base] : ['--base-memory', o.baseMemory ?? '', '--base-disk', o.baseDisk ?? ''];
  const stream = o.stream ? ['--resume-vm', ...(o.stream.qemuCommand ? ['--qemu-command', o.stream.qemuCommand] : [])] : [];
  const args = [main, 'receive', '--listen', o.listen ?? '127.0.0.1:0', ...bases, '--out', o.outDir, '--json', ...(o.serve ? ['--serve'] : []), ...(o.vm ? ['--resume-vm', '--kernel', o.vm.kernel, '--initrd', o.vm.initrd, '--base-device-state', o.vm.baseDeviceState] : []), ...stream];
  const [command, ...prefixArgs] = o.prefix?.length ? [...o.prefix, process.execPath] : [process.execPath];
  const child = spawn(command!, [...prefixArgs, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, HANDOFF_LOG_LEVEL: process.env.HANDOFF_LOG_LEVEL ?? 'warn', ...o.env },
    // its own process group: `kill(-pid)` takes its nats-server along (a cloudlet going down)
    detached: o.ownProcessGroup ?? false,
  });
  let stdout = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  const exited = new Promise<{ code: number; result: ReceivedMigration | undefined }>((resolve) =>
    child.once('exit', (code) => {
      let result: ReceivedMigration | undefined;
      try {
        result = JSON.parse(stdout) as ReceivedMigration;
      } catch {
        result = undefined;
      }
      resolve({ code: code ?? 1, result });
    }),
  );
  let tail = '';
  const waiting: { pattern: RegExp; resolve: () => void }[] = [];
  let partialLine = '';
  const onLog = (d: Buffer): void => {
    const text = d.toString();
    tail = (tail + text).slice(-TAIL_CHARS);
    const lines = (partialLine + text).split('\n');
    partialLine = lines.pop()!;
    for (const w of waiting.splice(0)) {
      if (lines.some((l) => w.pattern.test(l))) w.resolve();
      else waiting.push(w);
    }
  };
  const address = await new Promise<string>((resolve, reject) => {
    let log = '';
    const onData = (d: Buffer): void => {
      log += d.toString();
      const m = /receiver listening on (\S+)/.exec(log);
      if (m) {
        child.stderr!.off('data', onData);
        if (o.forwardLogs) child.stderr!.pipe(process.stderr);
        else child.stderr!.on('data', onLog);
        resolve(m[1]!);
      }
    };
    child.stderr!.on('data', onData);
    child.once('exit', (code) => reject(new Error(`destination receiver exited (${code}) before listening:\n${log}`)));
  });
  const waitForLog = (pattern: RegExp): Promise<void> => new Promise((resolve) => waiting.push({ pattern, resolve }));
  return { child, address, exited, logTail: () => tail, waitForLog };
}
