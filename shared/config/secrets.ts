/** Secrets from the environment: `NAME` itself, or the file `NAME_FILE` names (container secrets). */
import { readFileSync } from 'node:fs';

export function secretFromEnv(name: string, env: NodeJS.ProcessEnv): Buffer | undefined {
  const value = env[name];
  if (value) return Buffer.from(value);
  const file = env[`${name}_FILE`];
  if (!file) return undefined;
  try {
    return readFileSync(file);
  } catch (err) {
    throw new Error(`${name}_FILE: cannot read ${file}: ${(err as Error).message}`);
  }
}
