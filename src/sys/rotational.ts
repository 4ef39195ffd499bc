// Whether storage spins, from sysfs (Documentation/ABI/stable/sysfs-block, queue/rotational),
// so the server can set NBD_FLAG_ROTATIONAL and clients schedule I/O accordingly.

import { readFile } from 'node:fs/promises';

/** Split a Linux dev_t (new_encode_dev layout: minor in bits 0-7 and 20-31, major in 8-19 and 32+). */
export function splitDevT(dev: number): { major: number; minor: number } {
  const lo = dev % 2 ** 32;
  const hi = Math.floor(dev / 2 ** 32);
  const major = ((lo >>> 8) & 0xfff) | ((hi & 0xfffff) << 12);
  const minor = (lo & 0xff) | ((lo >>> 12) & 0xfff00);
  return { major: major >>> 0, minor: minor >>> 0 };
}

/**
 * True when the block device `dev` (st_rdev of a device node, or st_dev of a file's
 * filesystem) is rotational. Partitions have no queue/ of their own; their disk's is used.
 * Anything unreadable counts as not rotational (the NBD default).
 */
export async function isRotational(dev: number): Promise<boolean> {
  const { major, minor } = splitDevT(dev);
  const base = `/sys/dev/block/${major}:${minor}`;
  for (const p of [`${base}/queue/rotational`, `${base}/../queue/rotational`]) {
    try {
      return (await readFile(p, 'latin1')).trim() === '1';
    } catch {
      // try the next candidate
    }
  }
  return false;
}
