/** One-line logs that say which migration and which stage; JSON when HANDOFF_LOG=json. */

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };
const threshold = ORDER[(process.env.HANDOFF_LOG_LEVEL as LogLevel | undefined) ?? 'info'] ?? ORDER.info;
const asJson = process.env.HANDOFF_LOG === 'json';

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  child(fields: Record<string, unknown>): Logger;
}

export function createLogger(base: Record<string, unknown>): Logger {
  const emit = (level: LogLevel, msg: string, fields?: Record<string, unknown>): void => {
    if (ORDER[level] < threshold) return;
    const all = { ...base, ...fields };
    if (asJson) {
      process.stderr.write(`${JSON.stringify({ time: new Date().toISOString(), level, msg, ...all })}\n`);
      return;
    }
    const tags = Object.entries(all)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
      .join(' ');
    process.stderr.write(`${new Date().toISOString()} ${level.toUpperCase()} ${msg}${tags ? ` ${tags}` : ''}\n`);
  };
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (fields) => createLogger({ ...base, ...fields }),
  };
}
