/**
 * Field checks for JSON that comes from a peer or the bus: each names the field and the problem
 * (MalformedMessageError) instead of letting a wrong type travel on.
 */
import { MalformedMessageError } from './errors.js';
import type { ImageDigests } from './migration.js';

export function parseJson(text: string, what: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    throw new MalformedMessageError(`${what}: not JSON`);
  }
}

export function object(v: unknown, what: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new MalformedMessageError(`${what}: not an object`);
  return v as Record<string, unknown>;
}

export function count(v: unknown, what: string, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) throw new MalformedMessageError(`${what}: ${JSON.stringify(v)} is not a whole number in 0..${max}`);
  return v;
}

/** a finite, non-negative measurement (seconds, bytes per second, milliseconds) */
export function amount(v: unknown, what: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new MalformedMessageError(`${what}: ${JSON.stringify(v)} is not a non-negative number`);
  return v;
}

export function text(v: unknown, what: string, maxLength = 4096): string {
  if (typeof v !== 'string' || v.length > maxLength) throw new MalformedMessageError(`${what}: not a string of at most ${maxLength} characters`);
  return v;
}

const HASH = /^[0-9a-f]{16,128}$/;
export function digests(v: unknown, what: string): ImageDigests {
  const d = v as Partial<ImageDigests> | null;
  if (typeof d !== 'object' || d === null || typeof d.memory !== 'string' || typeof d.disk !== 'string' || !HASH.test(d.memory) || !HASH.test(d.disk)) {
    throw new MalformedMessageError(`${what}: image hashes missing or not hex`);
  }
  return { memory: d.memory, disk: d.disk };
}

/** `{ name: number }` with at most `maxKeys` entries */
export function counters(v: unknown, what: string, maxKeys = 64): Record<string, number> {
  const o = object(v, what);
  const keys = Object.keys(o);
  if (keys.length > maxKeys) throw new MalformedMessageError(`${what}: more than ${maxKeys} entries`);
  const out: Record<string, number> = {};
  for (const k of keys) {
    const n = o[k];
    if (typeof n !== 'number' || !Number.isFinite(n)) throw new MalformedMessageError(`${what}.${k}: not a number`);
    out[k] = n;
  }
  return out;
}
