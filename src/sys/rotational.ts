// Whether storage spins, from sysfs (Documentation/ABI/stable/sysfs-block, queue/rotational),
// so the server can set NBD_FLAG_ROTATIONAL and clients schedule I/O accordingly.

// Read synchronously: sysfs attributes are made in memory when read, and every image open asks,
// where a read through the thread pool took four round trips (open, stat, read, close).
import { readFileSync } from 'node:fs';

/**
 * Split a dev_t as glibc's gnu_dev_major/gnu_dev_minor do:
 *   major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfff)
 *   minor = (dev & 0xff) | ((dev >> 12) & ~0xff)
 * done on 32-bit halves because `dev` is a JavaScript number.
 */
export function splitDevT(dev: number): { major: number; minor: number } {
  const lo = dev % 2 ** 32;
  const hi = Math.floor(dev / 2 ** 32);
  const major = ((lo >>> 8) & 0xfff) | (hi & 0xfffff000);
  const minor = (lo & 0xff) | (((lo >>> 12) | ((hi & 0xfff) << 20)) & 0xffffff00);
  return { major: major >>> 0, minor: minor >>> 0 };
}

/**
 * True when the block device `dev` (st_rdev of a device node, or st_dev of a file's
 * filesystem) is rotational. Partitions have no queue/ of their own; their disk's is used.
 * Anything unreadable counts as not rotational (the NBD default).
 */
export function isRotational(dev: number): boolean {
  const { major, minor } = splitDevT(dev);
  const base = `/sys/dev/block/${major}:${minor}`;
  for (const p of [`${base}/queue/rotational`, `${base}/../queue/rotational`]) {
    try {
      return readFileSync(p, 'latin1').trim() === '1';
    } catch {
      // try the next candidate
    }
  }
  return false;
}
