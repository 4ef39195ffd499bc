// Parsing of command-line values, with qemu's spellings (sizes with k/M/G/T/P/E suffixes).

import { UsageError } from '../errors.js';

const SUFFIX: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/** "1G", "512M", "10k", "4096" (bytes), "1.5G"; binary multiples as qemu-img uses. */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) throw new UsageError(`invalid ${what} '${text}': use a number of bytes with an optional k, M, G, T, P or E suffix`);
  const value = Number(m[1]) * SUFFIX[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(Math.round(value)) || value < 0) throw new UsageError(`${what} '${text}' is too large`);
  if (!Number.isInteger(value)) throw new UsageError(`${what} '${text}' is not a whole number of bytes`);
  return value;
}

export function parseCount(text: string, what: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (!/^\d+$/.test(text.trim())) throw new UsageError(`invalid ${what} '${text}': expected a whole number`);
  const n = Number(text);
  if (n < min || n > max) throw new UsageError(`${what} must be between ${min} and ${max}, not ${n}`);
  return n;
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${bytes} B` : `${Number.isInteger(v) ? v : v.toFixed(2)} ${units[i]}`;
}

/** NBD URIs are recognised by scheme; anything else is a local image path. */
export function isNbdUri(text: string): boolean {
  return /^nbds?(\+(unix|vsock))?:\/\//.test(text);
}
