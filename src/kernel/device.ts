// What the kernel says about /dev/nbdN, from sysfs, devtmpfs and procfs (no udev is assumed):
//   /sys/block/nbdN/size        512-byte sectors; 0 until the size is published
//   /sys/block/nbdN/pid         exists while a client is connected (ioctl DO_IT or netlink)
//   /sys/block/nbdN/backend     the netlink backend identifier, while connected
//   /sys/block/nbdN/nbdNpM/dev  "major:minor" of each partition the kernel knows
//   /sys/block/nbdN/holders/    stacked devices (dm, md) holding the disk
//   /proc/self/mountinfo        what is mounted from which major:minor
// Roots are parameters so the logic can be tested against a fake tree.

import { existsSync, readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { UsageError } from '../errors.js';
import { splitDevT } from '../sys/rotational.js';

export interface SysRoots {
  /** Default /sys */
  readonly sys: string;
  /** Default /dev */
  readonly dev: string;
  /** Default /proc */
  readonly proc: string;
}

export const SYSTEM_ROOTS: SysRoots = { sys: '/sys', dev: '/dev', proc: '/proc' };

export interface NbdName {
  readonly index: number;
  /** Partition number, when the name is nbdNpM. */
  readonly partition?: number;
}

/** Parse "nbd3", "/dev/nbd3" or "nbd3p2"; null for anything else. */
export function parseNbdName(text: string): NbdName | null {
  const m = /^(?:\/dev\/)?nbd(\d+)(?:p(\d+))?$/.exec(text);
  if (!m) return null;
  const index = Number(m[1]);
  if (!Number.isSafeInteger(index)) return null;
  return m[2] === undefined ? { index } : { index, partition: Number(m[2]) };
}

function readText(path: string): string | null {
  try {
    return readFileSync(path, 'latin1').trim();
  } catch {
    return null;
  }
}

function blockDir(index: number, roots: SysRoots): string {
  return join(roots.sys, 'block', `nbd${index}`);
}

/** Every nbd device the module created, by index. */
export function listNbdIndices(roots: SysRoots = SYSTEM_ROOTS): number[] {
  let names: string[];
  try {
    names = readdirSync(join(roots.sys, 'block'));
  } catch {
    return [];
  }
  return names
    .map((n) => parseNbdName(n))
    .filter((n): n is NbdName => n !== null && n.partition === undefined)
    .map((n) => n.index)
    .sort((a, b) => a - b);
}

export function deviceExists(index: number, roots: SysRoots = SYSTEM_ROOTS): boolean {
  return existsSync(blockDir(index, roots));
}

/** Size in bytes as sysfs publishes it (0 while unconfigured), or null when there is no such device. */
export function deviceSizeBytes(index: number, roots: SysRoots = SYSTEM_ROOTS): number | null {
  const t = readText(join(blockDir(index, roots), 'size'));
  if (t === null || !/^\d+$/.test(t)) return null;
  return Number(t) * 512;
}

/** A client is connected (the pid attribute exists). */
export function deviceConnected(index: number, roots: SysRoots = SYSTEM_ROOTS): boolean {
  return existsSync(join(blockDir(index, roots), 'pid'));
}

/** The backend identifier of a netlink-connected device; null when absent. */
export function deviceBackend(index: number, roots: SysRoots = SYSTEM_ROOTS): string | null {
  return readText(join(blockDir(index, roots), 'backend'));
}

/** Free: not connected, and not being connected (size 0). */
export function deviceFree(index: number, roots: SysRoots = SYSTEM_ROOTS): boolean {
  return deviceExists(index, roots) && !deviceConnected(index, roots) && (deviceSizeBytes(index, roots) ?? 0) === 0;
}

/**
 * The lowest free device not in `exclude` (for the ioctl interface, which names the device
 * itself; the caller holds the attach lock and retries on EBUSY, since nbd-client may race).
 */
export function chooseFreeDevice(exclude: ReadonlySet<number> = new Set(), roots: SysRoots = SYSTEM_ROOTS): number | null {
  for (const i of listNbdIndices(roots)) {
    if (!exclude.has(i) && deviceFree(i, roots)) return i;
  }
  return null;
}

export interface KernelPartition {
  readonly number: number;
  /** nbdNpM */
  readonly name: string;
  /** "major:minor" */
  readonly devt: string;
  readonly sizeBytes: number;
}

/** The partitions the kernel currently knows on nbdN, by number. */
export function kernelPartitions(index: number, roots: SysRoots = SYSTEM_ROOTS): KernelPartition[] {
  const dir = blockDir(index, roots);
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return [];
  }
  const out: KernelPartition[] = [];
  for (const name of names) {
    const p = parseNbdName(name);
    if (p === null || p.index !== index || p.partition === undefined) continue;
    const devt = readText(join(dir, name, 'dev'));
    const size = readText(join(dir, name, 'size'));
    if (devt === null || !/^\d+:\d+$/.test(devt)) continue;
    out.push({ number: p.partition, name, devt, sizeBytes: size !== null && /^\d+$/.test(size) ? Number(size) * 512 : 0 });
  }
  return out.sort((a, b) => a.number - b.number);
}

/** "major:minor" of the whole disk. */
export function deviceDevt(index: number, roots: SysRoots = SYSTEM_ROOTS): string | null {
  return readText(join(blockDir(index, roots), 'dev'));
}

/**
 * /dev/<name> is a block device node for exactly `devt`. A node left over from an earlier
 * attach (devtmpfs without udev keeps them) either is missing or points elsewhere only if the
 * numbering changed; comparing with sysfs is what makes a present node trustworthy.
 */
export function nodeMatches(name: string, devt: string, roots: SysRoots = SYSTEM_ROOTS): boolean {
  try {
    const st = statSync(join(roots.dev, name));
    if (!st.isBlockDevice()) return false;
    const { major, minor } = splitDevT(st.rdev);
    return `${major}:${minor}` === devt;
  } catch {
    return false;
  }
}

/** The nbd module's max_part (rounded up by the kernel to 2^n-1); 0 means no partition devices. */
export function nbdMaxPart(roots: SysRoots = SYSTEM_ROOTS): number {
  const t = readText(join(roots.sys, 'module', 'nbd', 'parameters', 'max_part'));
  return t !== null && /^\d+$/.test(t) ? Number(t) : 0;
}

/** Names under holders/ of the disk and of each of its partitions. */
export function deviceHolders(index: number, roots: SysRoots = SYSTEM_ROOTS): string[] {
  const dirs = [join(blockDir(index, roots), 'holders'), ...kernelPartitions(index, roots).map((p) => join(blockDir(index, roots), p.name, 'holders'))];
  const out: string[] = [];
  for (const d of dirs) {
    try {
      out.push(...readdirSync(d));
    } catch {
      // no holders directory: nothing holds it
    }
  }
  return out;
}

export interface MountEntry {
  readonly mountId: number;
  /** "major:minor" of the mounted device. */
  readonly devt: string;
  readonly mountPoint: string;
  readonly fstype: string;
  readonly source: string;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescapeMountField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/**
 * Parse /proc/<pid>/mountinfo (proc(5)):
 *   36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
 *   id parent maj:min root mountpoint options [optional fields...] - fstype source superopts
 */
export function parseMountInfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    const f = line.split(' ');
    const sep = f.indexOf('-', 6);
    if (f.length < 10 || sep < 0 || sep + 2 >= f.length) continue;
    out.push({
      mountId: Number(f[0]),
      devt: f[2]!,
      mountPoint: unescapeMountField(f[4]!),
      fstype: f[sep + 1]!,
      source: unescapeMountField(f[sep + 2]!),
    });
  }
  return out;
}

export function readMounts(roots: SysRoots = SYSTEM_ROOTS): MountEntry[] {
  return parseMountInfo(readText(join(roots.proc, 'self', 'mountinfo')) ?? '');
}

/** Mounts of nbdN and of its partitions. */
export function deviceMounts(index: number, roots: SysRoots = SYSTEM_ROOTS, mounts: MountEntry[] = readMounts(roots)): MountEntry[] {
  const devts = new Set<string>();
  const whole = deviceDevt(index, roots);
  if (whole) devts.add(whole);
  for (const p of kernelPartitions(index, roots)) devts.add(p.devt);
  return mounts.filter((m) => devts.has(m.devt));
}

export interface Opener {
  readonly pid: number;
  readonly path: string;
}

/** Processes with nbdN or one of its partitions open (scans /proc/<pid>/fd). */
export function deviceOpeners(index: number, roots: SysRoots = SYSTEM_ROOTS): Opener[] {
  const names = new Set([`nbd${index}`, ...kernelPartitions(index, roots).map((p) => p.name)]);
  const paths = new Set([...names].map((n) => join('/dev', n)));
  const out: Opener[] = [];
  let pids: string[];
  try {
    pids = readdirSync(roots.proc).filter((n) => /^\d+$/.test(n));
  } catch {
    return [];
  }
  for (const pid of pids) {
    let fds: string[];
    try {
      fds = readdirSync(join(roots.proc, pid, 'fd'));
    } catch {
      continue;
    }
    for (const fd of fds) {
      let target: string;
      try {
        target = readlinkSync(join(roots.proc, pid, 'fd', fd));
      } catch {
        continue;
      }
      if (paths.has(target)) {
        out.push({ pid: Number(pid), path: target });
        break;
      }
    }
  }
  return out;
}

/** Resolve "nbd3" / "/dev/nbd3" / "/dev/nbd3p1" to the disk index; UsageError for other text. */
export function requireNbdIndex(text: string): number {
  const n = parseNbdName(text);
  if (n === null) throw new UsageError(`${JSON.stringify(text)} is not an nbd device (expected /dev/nbdN)`);
  return n.index;
}
