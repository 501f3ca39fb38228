/**
 * A Docker engine of the test's own: Debian's docker.io, installed when missing, its dockerd started
 * inside a network namespace the test makes (own data-root and socket, no iptables), so its bridges
 * and published ports stay there. The namespace is joined to this host by a veth pair and a route to
 * the containers' subnets: containers reach this host's address (the test's OTLP receiver, an HTTP
 * proxy for the builds), and nothing of the host's own network is changed.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess, type SpawnSyncReturns } from 'node:child_process';
import { existsSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { tbfArgs } from '../../load/lib/wan.js';
import { startHttpProxy, type HttpProxy } from './http-proxy.js';

/** Debian's engine and client (a newer client elsewhere on PATH may not speak to 20.10) */
const DOCKERD = '/usr/sbin/dockerd';
export const DOCKER = '/usr/bin/docker';
export const DOCKER_COMPOSE = '/usr/bin/docker-compose';

// the host's end, the namespace's end, and the containers' address pools (routed to the namespace)
const HOST_ADDRESS = '10.203.0.1';
const NS_ADDRESS = '10.203.0.2';
const BRIDGE_CIDR = '10.205.0.1/24';
const POOL_CIDR = '10.204.0.0/16';
const ROUTED_CIDR = '10.204.0.0/15';
/** what the builds may reach: Debian's and npm's registries, nothing else */
export const REGISTRY_HOSTS = ['deb.debian.org', 'registry.npmjs.org'];

export interface DockerEngine {
  /** this host as the containers reach it */
  hostAddress: string;
  /** the namespace's own address: the engine's published ports, as another host would reach them */
  nsAddress: string;
  /** for docker, docker-compose and infra/build-images.sh: DOCKER_HOST, DOCKER, the proxy */
  env: NodeJS.ProcessEnv;
  proxy: HttpProxy;
  /** runs the docker client; throws with its stderr when it fails */
  docker(args: string[]): string;
  /** shapes a docker network like a WAN (tbf on every port of its bridge); returns the ports shaped */
  shapeNetwork(network: string, rateBps: number): string[];
  /** stops every container, the engine and the proxy, and removes the namespace and the data-root */
  stop(): Promise<void>;
}

function run(cmd: string, args: string[]): void {
  execFileSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** Why no engine can be started here (undefined: it can). */
export function engineUnavailable(): string | undefined {
  if (process.platform !== 'linux') return 'Docker engine test: Linux only';
  if (process.getuid?.() !== 0) return 'Docker engine test: needs root (dockerd, network namespaces)';
  if (spawnSync('ip', ['netns', 'list'], { stdio: 'ignore' }).status !== 0) return 'Docker engine test: no iproute2 with network namespaces';
  if (!existsSync('/sys/fs/cgroup')) return 'Docker engine test: no cgroup file system';
  return undefined;
}

/** Installs Debian's engine, docker-compose and debootstrap when missing (apt-get). */
export function installEngine(): void {
  const missing = [
    [DOCKERD, 'docker.io'],
    [DOCKER_COMPOSE, 'docker-compose'],
    ['/usr/sbin/debootstrap', 'debootstrap'],
  ].filter(([path]) => !existsSync(path!)).map(([, pkg]) => pkg!);
  if (missing.length === 0) return;
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  // the package would start the system's own dockerd (with iptables): policy-rc.d says no for the install
  const policy = '/usr/sbin/policy-rc.d';
  const ownPolicy = !existsSync(policy);
  if (ownPolicy) writeFileSync(policy, '#!/bin/sh\nexit 101\n', { mode: 0o755 });
  try {
    for (const args of [['update', '-qq'], ['install', '-y', '-qq', '--no-install-recommends', ...missing]]) {
      const r = spawnSync('apt-get', args, { env, encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`apt-get ${args.join(' ')}: ${r.stderr.trim()}`);
    }
  } finally {
    if (ownPolicy) rmSync(policy, { force: true });
  }
}

/**
 * `dir` holds the engine's sockets, state and log, removed at the end; its images too, unless
 * HANDOFF_DOCKER_DATA_ROOT names a data-root to keep between runs (a developer's reruns then reuse
 * the build's layers).
 */
export async function startEngine(dir: string, tag = String(process.pid % 10000)): Promise<DockerEngine> {
  const dataRoot = process.env.HANDOFF_DOCKER_DATA_ROOT || join(dir, 'data');
  const ns = `ho-docker-${tag}`;
  const hostIf = `hodk${tag}`;
  const nsIf = `hodn${tag}`;
  const socket = join(dir, 'docker.sock');
  mkdirSync(dir, { recursive: true });
  const removeNetwork = (): void => {
    // deleting the namespace deletes the veth pair, and the route with it
    spawnSync('ip', ['netns', 'del', ns], { stdio: 'ignore' });
    spawnSync('ip', ['link', 'del', hostIf], { stdio: 'ignore' });
  };
  removeNetwork();
  // a run that was killed leaves its host end with the same address and route: gone first (the
  // addresses are fixed, so two runs of this test on one machine cannot overlap anyway)
  const stale = execFileSync('ip', ['-o', 'link', 'show'], { encoding: 'utf8' }).match(/\bhodk\d+(?=@)/g) ?? [];
  for (const link of stale) spawnSync('ip', ['link', 'del', link], { stdio: 'ignore' });
  try {
    run('ip', ['netns', 'add', ns]);
    run('ip', ['link', 'add', hostIf, 'type', 'veth', 'peer', 'name', nsIf]);
    run('ip', ['link', 'set', nsIf, 'netns', ns]);
    run('ip', ['addr', 'add', `${HOST_ADDRESS}/30`, 'dev', hostIf]);
    run('ip', ['link', 'set', hostIf, 'up']);
    run('ip', ['-n', ns, 'addr', 'add', `${NS_ADDRESS}/30`, 'dev', nsIf]);
    run('ip', ['-n', ns, 'link', 'set', nsIf, 'up']);
    run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    run('ip', ['-n', ns, 'route', 'add', 'default', 'via', HOST_ADDRESS]);
    run('ip', ['route', 'replace', ROUTED_CIDR, 'via', NS_ADDRESS]);
  } catch (err) {
    removeNetwork();
    const stderr = (err as { stderr?: Buffer }).stderr?.toString().trim();
    throw new Error(`cannot make the engine's network namespace: ${stderr || (err as Error).message}`);
  }

  const proxy = await startHttpProxy(HOST_ADDRESS, REGISTRY_HOSTS);
  const logPath = join(dir, 'dockerd.log');
  const log = openSync(logPath, 'a');
  // nsenter, not `ip netns exec`: the latter remounts /sys, and dockerd then finds no devices cgroup
  const dockerd: ChildProcess = spawn('nsenter', [`--net=/var/run/netns/${ns}`, DOCKERD,
    '--data-root', dataRoot, '--exec-root', join(dir, 'exec'), '--host', `unix://${socket}`,
    '--pidfile', join(dir, 'docker.pid'), '--iptables=false', '--ip-masq=false',
    '--bip', BRIDGE_CIDR, '--default-address-pool', `base=${POOL_CIDR},size=24`], { stdio: ['ignore', log, log] });
  let exited = false;
  dockerd.on('exit', () => (exited = true));

  const env: NodeJS.ProcessEnv = {
    ...process.env,
    DOCKER_HOST: `unix://${socket}`,
    DOCKER,
    http_proxy: proxy.url,
    https_proxy: proxy.url,
    no_proxy: 'localhost,127.0.0.1',
    // docker-compose 1.29 asks the terminal otherwise
    COMPOSE_INTERACTIVE_NO_CLI: '1',
  };
  const docker = (args: string[]): string => {
    const r: SpawnSyncReturns<string> = spawnSync(DOCKER, args, { env, encoding: 'utf8', maxBuffer: 64 << 20 });
    if (r.status !== 0) throw new Error(`docker ${args.join(' ')}: ${(r.stderr || r.stdout).trim()}`);
    return r.stdout;
  };

  const shapeNetwork = (network: string, rateBps: number): string[] => {
    const bridge = `br-${docker(['network', 'inspect', '--format', '{{.Id}}', network]).trim().slice(0, 12)}`;
    const ports = execFileSync('ip', ['-n', ns, '-o', 'link', 'show', 'master', bridge], { encoding: 'utf8' })
      .split('\n').map((l) => /^\d+: ([^@:]+)/.exec(l)?.[1]).filter((p): p is string => p !== undefined);
    // each port's egress is the traffic towards its container: both directions of the link are shaped
    for (const port of ports) run('ip', ['netns', 'exec', ns, 'tc', 'qdisc', 'replace', 'dev', port, 'root', ...tbfArgs(rateBps)]);
    return ports;
  };

  const stop = async (): Promise<void> => {
    if (!exited) {
      try {
        const ids = docker(['ps', '-aq']).split('\n').filter(Boolean);
        if (ids.length > 0) docker(['rm', '-f', ...ids]);
      } catch {
        // the engine is going anyway
      }
      dockerd.kill('SIGTERM');
      for (let i = 0; i < 100 && !exited; i++) await sleep(200);
      if (!exited) dockerd.kill('SIGKILL');
    }
    await proxy.close();
    removeNetwork();
    // overlay mounts a killed engine may leave behind
    spawnSync('sh', ['-c', `grep -o ' ${dir}/[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l`], { stdio: 'ignore' });
    rmSync(dir, { recursive: true, force: true });
  };

  for (let i = 0; i < 150; i++) {
    if (exited) break;
    if (existsSync(socket) && spawnSync(DOCKER, ['version'], { env, stdio: 'ignore' }).status === 0) {
      return { hostAddress: HOST_ADDRESS, nsAddress: NS_ADDRESS, env, proxy, docker, shapeNetwork, stop };
    }
    await sleep(200);
  }
  const tail = readFileSync(logPath, 'utf8').trim().split('\n').slice(-5).join('\n');
  await stop();
  throw new Error(`dockerd did not start: ${tail}`);
}
