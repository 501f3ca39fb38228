/** Human units on the command line: rates in bits per second, sizes in bytes. */

const RATE_UNITS: Record<string, number> = {
  bit: 1, kbit: 1e3, mbit: 1e6, gbit: 1e9, bps: 1, kbps: 1e3, mbps: 1e6, gbps: 1e9,
  b: 8, kb: 8e3, mb: 8e6, gb: 8e9, // bytes per second, tc-style
};

/** `10mbit`, `500kbit`, `1gbit`, `2mb` (bytes/s) -> bits per second. */
export function parseRateBps(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([a-z]*)$/i.exec(text.trim());
  const unit = m?.[2]?.toLowerCase() || 'bit';
  const factor = RATE_UNITS[unit];
  if (!m || factor === undefined) throw new Error(`bad rate ${JSON.stringify(text)}: use e.g. 10mbit, 500kbit, 1gbit`);
  const bps = Number(m[1]) * factor;
  if (!(bps > 0)) throw new Error(`bad rate ${JSON.stringify(text)}: must be positive`);
  return bps;
}

const SIZE_UNITS: Record<string, number> = { '': 1, b: 1, k: 1024, kib: 1024, m: 1024 ** 2, mib: 1024 ** 2, g: 1024 ** 3, gib: 1024 ** 3 };

/** `64MiB`, `1g`, `4096` -> bytes. */
export function parseSizeBytes(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([a-z]*)$/i.exec(text.trim());
  const factor = SIZE_UNITS[m?.[2]?.toLowerCase() ?? 'x'];
  if (!m || factor === undefined) throw new Error(`bad size ${JSON.stringify(text)}: use e.g. 64MiB, 1GiB`);
  return Math.round(Number(m[1]) * factor);
}

export function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

export function formatRate(bps: number): string {
  if (bps >= 1e9) return `${(bps / 1e9).toFixed(2)} Gbit/s`;
  if (bps >= 1e6) return `${(bps / 1e6).toFixed(1)} Mbit/s`;
  return `${(bps / 1e3).toFixed(0)} kbit/s`;
}
