/** A process's /proc/PID/stat, the fields this project reads (see proc(5)). */
import { readFileSync } from 'node:fs';

/** /proc counts CPU in USER_HZ ticks: 100 a second on every Linux architecture Node runs on */
export const TICKS_PER_SECOND = 100;

export interface ProcStat {
  /** R running, S sleeping, Z zombie (ended, not yet reaped), ... */
  state: string;
  ppid: number;
  /** its own CPU, in ticks */
  utimeTicks: number;
  stimeTicks: number;
  /** CPU of its children that ended and were waited for (theirs included), in ticks */
  cutimeTicks: number;
  cstimeTicks: number;
}

/**
 * The fields of a /proc/PID/stat text. The command (field 2) is in parentheses and may hold spaces
 * and parentheses itself: the fields are counted from after its last ')'.
 */
export function parseProcStat(text: string): ProcStat {
  // from field 3 (state) on
  const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const at = (field: number): string => f[field - 3] ?? '';
  return {
    state: at(3),
    ppid: Number(at(4)),
    utimeTicks: Number(at(14)),
    stimeTicks: Number(at(15)),
    cutimeTicks: Number(at(16)),
    cstimeTicks: Number(at(17)),
  };
}

/** The stat of process `pid` (or "self"); undefined where there is none to read (it ended, or no /proc). */
export function readProcStat(pid: number | string | undefined): ProcStat | undefined {
  if (pid === undefined) return undefined;
  try {
    return parseProcStat(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return undefined;
  }
}
