/**
 * The ratio probe in a process of its own at the lowest CPU priority (nice 19): it takes only the
 * CPU the pipeline leaves idle, which is there when its answer matters, when the pipeline waits on
 * the link. Run at the tuner's priority on a one-core source, its 0.3-0.55 s of CPU came out of the
 * pipeline's, and the look waiting for it waited 2-4 s while the cores were the bottleneck (256
 * MiB at 1000 Mbit/s). Not a worker thread, though Linux keeps a nice value per thread: a thread's
 * start-up and Piscina's hand-off took ~100 ms of CPU at the tuner's priority before the thread
 * could lower its own, at the moment the pipeline starts; `nice` starts this one low from the first
 * instruction. The task goes in on stdin and the result comes out on stdout, as JSON.
 */
import { spawn } from 'node:child_process';
import { getPriority, setPriority } from 'node:os';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { errorMessage } from '../../shared/errors.js';
import { probeRatios, type ProbeImages, type ProbePlan, type ProbeResult } from './probe.js';

export const PROBE_NICE = 19;

export interface ProbeTask {
  images: ProbeImages;
  plan: ProbePlan;
}

export interface ProbeOutcome {
  /** undefined: too few changed pages to say anything */
  probe?: ProbeResult;
  /** the probe process's nice value */
  niceness: number;
}

/** what crosses stdout: the ratios as entries */
interface WireOutcome {
  probe?: Omit<ProbeResult, 'ratios'> & { ratios: [string, number][] };
  niceness: number;
  error?: string;
}

const SELF = fileURLToPath(import.meta.url);

/**
 * Runs the probe in a child process under `nice -n 19` (where `nice` is missing, the child is
 * lowered once started). Rejects with the child's error, naming what failed (an unreadable image
 * names the file). `signal` stops it.
 */
export function runProbeProcess(task: ProbeTask, signal?: AbortSignal): Promise<ProbeOutcome> {
  return new Promise((resolve, reject) => {
    const start = (command: string, args: string[]): void => {
      const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'inherit'], signal });
      let spawned = false;
      let out = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
      child.once('spawn', () => {
        spawned = true;
        if (command === process.execPath && child.pid !== undefined) {
          try {
            setPriority(child.pid, PROBE_NICE);
          } catch {
            // left at the tuner's priority: the probe still runs
          }
        }
        child.stdin.end(JSON.stringify(task));
      });
      child.once('error', (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT' && command === 'nice') return start(process.execPath, [SELF]);
        reject(new Error(`ratio probe process: ${errorMessage(err)}`));
      });
      child.once('close', (code) => {
        if (!spawned) return; // the error says why
        let outcome: WireOutcome;
        try {
          outcome = JSON.parse(out) as WireOutcome;
        } catch {
          return reject(new Error(`ratio probe process exited ${code ?? 'on a signal'} without a result`));
        }
        if (outcome.error !== undefined) return reject(new Error(outcome.error));
        const { probe, niceness } = outcome;
        resolve({ niceness, ...(probe ? { probe: { ...probe, ratios: new Map(probe.ratios) } } : {}) });
      });
    };
    start('nice', ['-n', String(PROBE_NICE), process.execPath, SELF]);
  });
}

/** the child's side: the task from stdin, the outcome to stdout */
async function probeMain(): Promise<void> {
  const niceness = getPriority();
  let input = '';
  for await (const part of process.stdin) input += String(part);
  let outcome: WireOutcome;
  try {
    const { images, plan } = JSON.parse(input) as ProbeTask;
    const probe = await probeRatios(images, plan);
    outcome = { niceness, ...(probe ? { probe: { ...probe, ratios: [...probe.ratios] } } : {}) };
  } catch (err) {
    outcome = { niceness, error: errorMessage(err) };
  }
  process.stdout.write(JSON.stringify(outcome));
}

if (process.argv[1] && pathToFileURL(process.argv[1]).href === import.meta.url) await probeMain();
