/**
 * The deployment files: compose files valid (`docker compose config` where the plugin exists,
 * Debian's `docker-compose` 1.29 where it is installed, and the compose-spec schema through dclint), NATS configurations accepted by nats-server, and every
 * setting they pass one the code reads.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';
import { parse } from 'yaml';
import { ACTOR_NAMES } from '../cli/actors.js';
import { NATS_SERVER_BIN } from '../shared/bus/nats-server.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const INFRA = join(ROOT, 'infra');
const COMPOSE_FILES = [
  { file: 'compose.yml', env: ['cloudlet-a.env', 'cloudlet-b.env'] },
  { file: 'compose.worker-host.yml', env: ['worker-host.env'] },
];

const hasComposePlugin = spawnSync('docker', ['compose', 'version'], { stdio: 'ignore' }).status === 0;
const hasCompose1 = spawnSync('docker-compose', ['version'], { stdio: 'ignore' }).status === 0;
const validators = ['compose-spec schema (dclint)', ...(hasComposePlugin ? ['docker compose config'] : []), ...(hasCompose1 ? ['docker-compose 1.x config'] : [])];

/** Validates a compose file with every checker this machine has; returns the problems (empty: valid). */
function validateCompose(file: string, envFile: string): string {
  const problems: string[] = [];
  const check = (cmd: string, args: string[]): void => {
    const r = spawnSync(cmd, args, { encoding: 'utf8', cwd: INFRA });
    if (r.status !== 0) problems.push(`${cmd}: ${r.stdout}${r.stderr}`);
  };
  check(join(ROOT, 'node_modules', '.bin', 'dclint'), ['-q', '--color', 'false', '-c', join(INFRA, 'dclint.json'), file]);
  if (hasComposePlugin) check('docker', ['compose', '-f', file, '--env-file', envFile, 'config', '-q']);
  if (hasCompose1) check('docker-compose', ['-f', file, '--env-file', envFile, 'config', '-q']);
  return problems.join('\n');
}

interface ComposeService {
  command?: string[];
  container_name?: string;
  ports?: string[];
  environment?: Record<string, string>;
  deploy?: unknown;
}

/** Every source file's text, to check that a setting named in the deployment is read somewhere. */
function sourceText(): string {
  let text = '';
  const walk = (dir: string): void => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      if (e.isDirectory()) walk(join(dir, e.name));
      else if (e.name.endsWith('.ts')) text += readFileSync(join(dir, e.name), 'utf8');
    }
  };
  for (const d of ['cli', 'services', 'shared']) walk(join(ROOT, d));
  return text;
}

describe('deployment files', () => {
  test(`compose files are valid (${validators.join(', ')})`, () => {
    for (const { file, env } of COMPOSE_FILES) {
      for (const e of env) assert.equal(validateCompose(file, e), '', `${file} with ${e}`);
    }
  });

  test('an invalid compose file is refused by the same check', () => {
    const broken = readFileSync(join(INFRA, 'compose.yml'), 'utf8').replace('restart: unless-stopped', 'restart: unless-stopped\n  restart_policy_typo: always');
    const file = join(tmpdir(), `broken-compose-${process.pid}.yml`);
    writeFileSync(file, broken);
    assert.notEqual(validateCompose(file, join(INFRA, 'cloudlet-a.env')), '');
  });

  test('every actor is a service; compress scales (no fixed name or port)', () => {
    const compose = parse(readFileSync(join(INFRA, 'compose.yml'), 'utf8')) as { services: Record<string, ComposeService> };
    for (const actor of ACTOR_NAMES) {
      const service = compose.services[actor];
      assert.ok(service, `no service for actor ${actor}`);
      assert.deepEqual(service.command?.slice(0, 2), ['actor', actor]);
    }
    assert.equal(compose.services.receiver?.command?.slice(0, 2).join(' '), 'receive --serve');
    assert.equal(compose.services.compress?.container_name, undefined);
    assert.equal(compose.services.compress?.ports, undefined);
  });

  test('every HANDOFF_ setting the deployment passes is one the code reads', () => {
    const code = sourceText();
    for (const { file } of COMPOSE_FILES) {
      // the keys of `environment:` maps (not compose's own ${VARIABLES})
      const names = new Set([...readFileSync(join(INFRA, file), 'utf8').matchAll(/^\s+(HANDOFF_[A-Z0-9_]+):/gm)].map((m) => m[1]!));
      assert.ok(names.size > 3);
      for (const name of names) {
        // *_FILE variants are read through their base name (see shared/wire/link-security.ts, nats-auth.ts)
        const read = code.includes(name) || (name.endsWith('_FILE') && code.includes(name.slice(0, -'_FILE'.length)));
        assert.ok(read, `${file} sets ${name}, which nothing reads`);
      }
    }
  });

  test('NATS configurations are accepted by nats-server', () => {
    const env = { ...process.env, NATS_PASSWORD: 'x', NATS_LEAF_PASSWORD: 'y', NATS_LEAF_URL: 'nats-leaf://leaf:y@cloudlet:7422' };
    for (const conf of ['cloudlet.conf', 'leaf.conf']) {
      const r = spawnSync(NATS_SERVER_BIN, ['-c', join(INFRA, 'nats', conf), '-t'], { env, encoding: 'utf8' });
      assert.equal(r.status, 0, `${conf}: ${r.stderr}`);
    }
  });

  test('the Dockerfile copies what exists', () => {
    const dockerfile = readFileSync(join(INFRA, 'Dockerfile'), 'utf8');
    const sources = [...dockerfile.matchAll(/^COPY (?!--from)(.+) \S+$/gm)].flatMap((m) => m[1]!.split(/\s+/));
    assert.ok(sources.length > 5);
    for (const s of sources) assert.ok(existsSync(join(ROOT, s)), `Dockerfile copies ${s}, which is not in the repository`);
  });
});
