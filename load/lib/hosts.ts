/**
 * Two hosts of one source cloudlet on this machine: two network namespaces joined by a veth pair,
 * the cloudlet's nats-server (JetStream, domain `cloudlet`) on host 1 and a leaf-node nats-server
 * on host 2, through which host 2's actors reach the cloudlet's streams. Needs root; removes
 * everything it made.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { MigrationSummary } from '../../cli/summary.js';
import { startEmbeddedNats, type EmbeddedNats } from '../../shared/bus/nats-server.js';
import { createShapedLink } from './wan.js';

export const JS_DOMAIN = 'cloudlet';
const MAIN = fileURLToPath(new URL('../../cli/main.js', import.meta.url));

export interface TwoHosts {
  /** command prefixes that run a program on each host */
  host1: string[];
  host2: string[];
  hub: EmbeddedNats;
  leaf: EmbeddedNats;
  destroy(): Promise<void>;
}

export async function startTwoHosts(tag: string): Promise<TwoHosts> {
  // the hosts are joined at 10 Gbit/s: a LAN inside the cloudlet, not a WAN
  const link = createShapedLink(10e9, tag);
  const host1 = ['ip', 'netns', 'exec', link.sourceNs];
  const host2 = ['ip', 'netns', 'exec', link.destNs];
  const stops: (() => Promise<void>)[] = [];
  try {
    const leafPassword = `leaf-${process.pid}-${tag}`;
    const hub = await startEmbeddedNats({ host: '0.0.0.0', prefix: host1, leafHub: { port: 7422, user: 'leaf', password: leafPassword, domain: JS_DOMAIN } });
    stops.push(hub.stop);
    const leaf = await startEmbeddedNats({ prefix: host2, leafOf: `nats-leaf://leaf:${leafPassword}@${link.sourceIp}:7422` });
    stops.push(leaf.stop);
    return {
      host1,
      host2,
      hub,
      leaf,
      destroy: async () => {
        for (const stop of stops.reverse()) await stop();
        link.destroy();
      },
    };
  } catch (err) {
    for (const stop of stops.reverse()) await stop();
    link.destroy();
    throw err;
  }
}

/** `handoff migrate --json ARGS` on a host; resolves with its summary. */
export async function migrateOn(host: string[], args: string[]): Promise<MigrationSummary> {
  const child = spawn(host[0]!, [...host.slice(1), process.execPath, MAIN, 'migrate', '--json', '--no-progress', ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, HANDOFF_LOG_LEVEL: process.env.HANDOFF_LOG_LEVEL ?? 'warn' },
  });
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  await new Promise<void>((res) => child.once('exit', () => res()));
  try {
    return JSON.parse(out) as MigrationSummary;
  } catch {
    throw new Error(`migrate printed no summary: ${out.slice(0, 500)}`);
  }
}
