/**
 * A real shaped WAN on one machine: two network namespaces (source and destination cloudlet) joined
 * by a veth pair, the source side shaped with `tc tbf`. Needs root and iproute2; uses only addresses
 * inside its own namespaces, and removes everything it made.
 */
import { execFileSync, spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';

export interface ShapedLink {
  sourceNs: string;
  destNs: string;
  sourceIp: string;
  destIp: string;
  /** sets the rate from now; returns the bytes sent up to the change (as sentBytes) */
  setRate(rateBps: number): number;
  /** takes the source's end of the link down (a cut cable) or up again */
  setUp(up: boolean): void;
  /** bytes the source has sent over the link so far (tc's counter: what crossed the wire, headers included; across rate changes) */
  sentBytes(): number;
  /** runs a command inside a namespace */
  spawnIn(ns: string, command: string, args: string[], options?: SpawnOptions): ChildProcess;
  destroy(): void;
}

function run(cmd: string, args: string[]): void {
  execFileSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

export function tbfArgs(rateBps: number): string[] {
  // tbf never sends a packet larger than its burst, and veth passes GSO packets of up to 64 KiB
  // (TCP makes them large at high rates and keeps them after a rate change): the burst must hold
  // one; at high rates ~10 ms of the rate
  const burstBytes = Math.max(65536 + 1514, Math.round(rateBps / 8 / 100));
  return ['tbf', 'rate', `${Math.round(rateBps)}bit`, 'burst', `${burstBytes}b`, 'latency', '400ms'];
}

export function createShapedLink(rateBps: number, tag = String(process.pid % 100000)): ShapedLink {
  const sourceNs = `ho-src-${tag}`;
  const destNs = `ho-dst-${tag}`;
  const sourceIf = `hos${tag}`;
  const destIf = `hod${tag}`;
  const sourceIp = '10.213.77.1';
  const destIp = '10.213.77.2';
  const destroy = (): void => {
    for (const ns of [sourceNs, destNs]) {
      try {
        run('ip', ['netns', 'del', ns]);
      } catch {
        // not there
      }
    }
  };
  destroy();
  try {
    run('ip', ['netns', 'add', sourceNs]);
    run('ip', ['netns', 'add', destNs]);
    run('ip', ['link', 'add', sourceIf, 'type', 'veth', 'peer', 'name', destIf]);
    run('ip', ['link', 'set', sourceIf, 'netns', sourceNs]);
    run('ip', ['link', 'set', destIf, 'netns', destNs]);
    for (const [ns, ifname, ip] of [[sourceNs, sourceIf, sourceIp], [destNs, destIf, destIp]] as const) {
      run('ip', ['-n', ns, 'addr', 'add', `${ip}/30`, 'dev', ifname]);
      run('ip', ['-n', ns, 'link', 'set', ifname, 'up']);
      run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    }
    run('ip', ['netns', 'exec', sourceNs, 'tc', 'qdisc', 'add', 'dev', sourceIf, 'root', ...tbfArgs(rateBps)]);
  } catch (err) {
    destroy();
    const stderr = (err as { stderr?: Buffer }).stderr?.toString().trim();
    throw new Error(`cannot set up the shaped link (needs root, iproute2 and tc): ${stderr || (err as Error).message}`);
  }
  const qdiscSentBytes = (): number => {
    const out = execFileSync('ip', ['netns', 'exec', sourceNs, 'tc', '-s', 'qdisc', 'show', 'dev', sourceIf], { encoding: 'utf8' });
    return Number(/Sent (\d+) bytes/.exec(out)?.[1] ?? 0);
  };
  /** what the counter had counted before a rate change set it back to 0 */
  let sentBeforeChanges = 0;
  let rateBpsNow = rateBps;
  return {
    sourceNs,
    destNs,
    sourceIp,
    destIp,
    setRate: (bps) => {
      const before = qdiscSentBytes();
      if (bps < rateBpsNow) {
        // a slower link drops what its queue held (TCP sends it again): packets queued at the fast
        // rate's burst stayed in tbf's queue after a `change` and the link carried nothing more
        run('ip', ['netns', 'exec', sourceNs, 'tc', 'qdisc', 'replace', 'dev', sourceIf, 'root', 'pfifo']);
        run('ip', ['netns', 'exec', sourceNs, 'tc', 'qdisc', 'replace', 'dev', sourceIf, 'root', ...tbfArgs(bps)]);
      } else run('ip', ['netns', 'exec', sourceNs, 'tc', 'qdisc', 'change', 'dev', sourceIf, 'root', ...tbfArgs(bps)]);
      rateBpsNow = bps;
      // tbf's `change` starts its statistics again
      const sentBefore = sentBeforeChanges + before;
      if (qdiscSentBytes() < before) sentBeforeChanges += before;
      return sentBefore;
    },
    setUp: (up) => run('ip', ['-n', sourceNs, 'link', 'set', sourceIf, up ? 'up' : 'down']),
    sentBytes: () => sentBeforeChanges + qdiscSentBytes(),
    spawnIn: (ns, command, args, options = {}) => spawn('ip', ['netns', 'exec', ns, command, ...args], options),
    destroy,
  };
}
