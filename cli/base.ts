/** `handoff base`: a base snapshot of a running VM, into the folder every cloudlet holds. */
import { parseArgs } from 'node:util';
import { formatBytes } from '../shared/config/units.js';
import { errorMessage } from '../shared/model/errors.js';
import { takeBase, type BaseSummary } from '../shared/vm/base-snapshot.js';
import { formatTable } from './summary.js';

export const BASE_HELP = `handoff base: take a base snapshot of a running VM

  --qmp SOCKET                   the VM's QMP socket (QEMU started however its owner starts it:
                                 any machine, ordinary RAM, raw or qcow2 disks). Nothing else may be
                                 connected to it while the base is taken (QEMU serves one client)
  --out DIR                      the base folder to create (absent or empty)
  --timeout SECONDS              how long QEMU's migration may take before it is cancelled (default 600)
  --json                         print one JSON summary object on stdout

The RAM is taken through QEMU's own migration into a socket this command reads: the guest runs on
while its memory is read, is paused only for the last round and QEMU's device state, and is resumed
at once (the pause is reported). A VM that was not running stays so. Then each disk the command
line names is copied (sparse, a reflink where the file system has them) and the RAM image's page
index is built, once, for every handoff against this base. The folder holds:
  base.json                      the manifest: QEMU version, the source's command line and machine,
                                 RAM blocks, files, sizes and the memory's content hash
  memory.img                     the RAM blocks one after another (sparse: zero pages are holes)
  memory.img.hidx                its page index (and diskN.img.hidx, a raw disk's)
  device-state.bin               QEMU's migration stream without its RAM
  diskN.img / diskN.qcow2        a copy of drive N
Copy the folder to every cloudlet that may receive this VM: a handoff sends what differs from it.
Needs root, or QEMU's user, to find the QEMU process behind the socket (its command line).
On a failure the guest is left running and the partial folder removed.
Exit status: 0 when the base was written, 1 when it was not, 2 for wrong options.`;

export function formatBaseSummary(s: BaseSummary): string {
  const head =
    `base written to ${s.dir} in ${s.seconds.toFixed(1)} s (QEMU's migration ${s.migrationSeconds.toFixed(1)} s, ${formatBytes(s.streamBytes)} streamed); ` +
    (s.pausedMs === null ? 'the VM was not running and stays so' : `the guest was paused ${Math.round(s.pausedMs)} ms and runs on`);
  const table = formatTable([['file', 'size', 'on disk'], ...s.files.map((f) => [f.file, formatBytes(f.bytes), formatBytes(f.allocatedBytes)])]);
  return [
    head,
    table.replace(/^/gm, '  '),
    `  RAM blocks: ${s.ramBlocks.map((b) => `${b.idstr} ${formatBytes(b.bytes)}`).join(', ')}`,
    `  memory content hash ${s.contentHash}`,
  ].join('\n');
}

/** Runs `handoff base` with the arguments after the command name; returns the exit status. */
export async function baseMain(argv: string[]): Promise<number> {
  let values: { qmp?: string; out?: string; timeout?: string; json?: boolean; help?: boolean };
  try {
    ({ values } = parseArgs({
      args: argv,
      options: { qmp: { type: 'string' }, out: { type: 'string' }, timeout: { type: 'string' }, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
    }));
  } catch (err) {
    process.stderr.write(`handoff base: ${errorMessage(err)} (see 'handoff base --help')\n`);
    return 2;
  }
  if (values.help) {
    console.log(BASE_HELP);
    return 0;
  }
  const missing = (['qmp', 'out'] as const).filter((k) => values[k] === undefined);
  if (missing.length) {
    process.stderr.write(`handoff base: missing ${missing.map((k) => `--${k}`).join(', ')} (see 'handoff base --help')\n`);
    return 2;
  }
  const timeoutSeconds = values.timeout === undefined ? 600 : Number(values.timeout);
  if (!Number.isFinite(timeoutSeconds) || timeoutSeconds <= 0) {
    process.stderr.write(`handoff base: --timeout must be a number of seconds above 0, not ${JSON.stringify(values.timeout)}\n`);
    return 2;
  }
  // SIGTERM or Ctrl-C: the migration is cancelled, the guest runs on, the partial folder goes
  const stop = new AbortController();
  const onSignal = (): void => stop.abort();
  process.once('SIGTERM', onSignal);
  process.once('SIGINT', onSignal);
  try {
    const summary = await takeBase({
      qmpSocket: values.qmp!,
      outDir: values.out!,
      migrationTimeoutMs: timeoutSeconds * 1000,
      signal: stop.signal,
      log: (line) => void process.stderr.write(`${line}\n`),
    });
    console.log(values.json ? JSON.stringify(summary) : formatBaseSummary(summary));
    return 0;
  } catch (err) {
    process.stderr.write(`handoff base: ${errorMessage(err)}\n`);
    return 1;
  } finally {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
  }
}
