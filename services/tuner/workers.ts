/**
 * The tuner's wish for compress workers in use: one count per followed migration, the bucket holds
 * the largest (every worker in use where none is wished). Pure: the service writes what `due` says.
 */
import { PRESENCE_TTL_MS } from '../../shared/bus/presence.js';

/** the wish is written again this long after its last write (it lives PRESENCE_TTL_MS) */
export const WISH_REFRESH_MS = PRESENCE_TTL_MS / 3;

export class WorkersWish {
  /** compress workers wanted in use, per followed migration */
  private readonly wantedBy = new Map<string, number>();
  private written: { workers: number | undefined; atMs: number } | undefined;

  /** `migrationId` wants `workers` in use; whether that changed its wish */
  set(migrationId: string, workers: number): boolean {
    const changed = this.wantedBy.get(migrationId) !== workers;
    this.wantedBy.set(migrationId, workers);
    return changed;
  }

  forget(migrationId: string): void {
    this.wantedBy.delete(migrationId);
  }

  /** drops the wishes of migrations no longer followed */
  keepOnly(followed: { has(migrationId: string): boolean }): void {
    for (const migrationId of this.wantedBy.keys()) if (!followed.has(migrationId)) this.wantedBy.delete(migrationId);
  }

  /** the largest wish, undefined where none */
  get wanted(): number | undefined {
    return this.wantedBy.size > 0 ? Math.max(...this.wantedBy.values()) : undefined;
  }

  /**
   * Whether the wish is to be written at `nowMs`: when it changed, and again well inside its age
   * while there is one (it expires with the entry if the tuner stops).
   */
  due(nowMs: number): boolean {
    const wanted = this.wanted;
    const last = this.written;
    if (last === undefined) return wanted !== undefined;
    return last.workers !== wanted || (wanted !== undefined && nowMs - last.atMs >= WISH_REFRESH_MS);
  }

  /** `workers` was written at `atMs` */
  wrote(workers: number | undefined, atMs: number): void {
    this.written = { workers, atMs };
  }
}
