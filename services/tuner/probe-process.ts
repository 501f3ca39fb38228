/**
 * The ratio probe in a process of its own, at the priority the tuner gives it: the tuner's own where
 * the probe's answer decides the next mode (the link is the bottleneck, and the pipeline's CPU goes
 * to chunks racing ahead of it), the lowest (nice 19) where it may, which takes only the CPU the
 * pipeline leaves idle (at nice 19 from the start, the first look waited past the probe behind the
 * pipeline). A process, not a worker thread, though Linux keeps a nice value per thread: a thread's
 * start-up and hand-off run at the tuner's priority before it can lower its own; `nice` starts this
 * one low from the first instruction. The task goes in on stdin and the result comes out on stdout,
 * as JSON. (From the destination's accept, while capture waits and the core is free, the tuner
 * probes in its own process instead: this one's start-up costs more than the probe.)
 */
import { spawn } from 'node:child_process';
import { getPriority, setPriority } from 'node:os';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { errorMessage } from '../../shared/model/errors.js';
import { probeRatios, type ProbeImages, type ProbePlan, type ProbeResult } from './probe.js';

/** the probe's priority where its answer may wait */
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
 * Runs the probe in a child process, under `nice -n <niceness>` where niceness is above 0 (where
 * `nice` is missing, the child is lowered once started). Rejects with the child's error, naming
 * what failed (an unreadable image names the file). `signal` stops it.
 */
export function runProbeProcess(task: ProbeTask, niceness: number, signal?: AbortSignal): Promise<ProbeOutcome> {
  return new Promise((resolve, reject) => {
    const start = (command: string, args: string[]): void => {
      const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'inherit'], signal });
      let spawned = false;
      let out = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
      child.once('spawn', () => {
        spawned = true;
        if (command === process.execPath && niceness > 0 && child.pid !== undefined) {
          try {
            setPriority(child.pid, niceness);
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
    if (niceness > 0) start('nice', ['-n', String(niceness), process.execPath, SELF]);
    else start(process.execPath, [SELF]);
  });
}

/** the child's side: the task from stdin, the outcome to stdout */
async function probeMain(): Promise<void> {
  const niceness = getPriority();
  let input = '';
  process.stdin.setEncoding('utf8'); // an image's path may hold characters split across reads
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
