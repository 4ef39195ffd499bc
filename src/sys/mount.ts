// mount(2) and umount2(2) through koffi, and the translation of mount(8)-style `-o` option
// strings into MS_* flags plus the filesystem's data string (sys/mount.h, mount(8) "FILESYSTEM-
// INDEPENDENT MOUNT OPTIONS").
//
// Both calls run on the thread pool: mounting or unmounting a device this very process serves
// (the attach supervisor) reads and writes through the event loop, which must keep running.

import koffi from 'koffi';
import { UsageError } from '../errors.js';
import { SyscallError } from './errno.js';

export const MS = {
  RDONLY: 1,
  NOSUID: 2,
  NODEV: 4,
  NOEXEC: 8,
  SYNCHRONOUS: 16,
  MANDLOCK: 64,
  DIRSYNC: 128,
  NOATIME: 1024,
  NODIRATIME: 2048,
  SILENT: 32768,
  RELATIME: 1 << 21,
  STRICTATIME: 1 << 24,
  LAZYTIME: 1 << 25,
} as const;

export const MNT_FORCE = 1;
export const MNT_DETACH = 2;
export const UMOUNT_NOFOLLOW = 8;

/** Options mount(8) turns into flags: [set, clear]. */
const FLAG_OPTIONS: Record<string, readonly [number, number]> = {
  ro: [MS.RDONLY, 0],
  rw: [0, MS.RDONLY],
  nosuid: [MS.NOSUID, 0],
  suid: [0, MS.NOSUID],
  nodev: [MS.NODEV, 0],
  dev: [0, MS.NODEV],
  noexec: [MS.NOEXEC, 0],
  exec: [0, MS.NOEXEC],
  sync: [MS.SYNCHRONOUS, 0],
  async: [0, MS.SYNCHRONOUS],
  dirsync: [MS.DIRSYNC, 0],
  mand: [MS.MANDLOCK, 0],
  nomand: [0, MS.MANDLOCK],
  noatime: [MS.NOATIME, 0],
  atime: [0, MS.NOATIME],
  nodiratime: [MS.NODIRATIME, 0],
  diratime: [0, MS.NODIRATIME],
  relatime: [MS.RELATIME, 0],
  norelatime: [0, MS.RELATIME],
  strictatime: [MS.STRICTATIME, 0],
  nostrictatime: [0, MS.STRICTATIME],
  lazytime: [MS.LAZYTIME, 0],
  nolazytime: [0, MS.LAZYTIME],
  silent: [MS.SILENT, 0],
  loud: [0, MS.SILENT],
  defaults: [0, 0],
};

/** Options that change what mount(2) does rather than how the filesystem behaves. */
const REFUSED = new Set(['remount', 'bind', 'rbind', 'move', 'shared', 'private', 'slave', 'unbindable', 'loop']);

export interface MountOptions {
  readonly flags: number;
  /** Comma-separated filesystem-specific options, passed as mount(2)'s data. */
  readonly data: string;
}

/** Split `-o a,b=c,...` into MS_* flags and the filesystem's own options; `readOnly` forces ro. */
export function parseMountOptions(text: string | undefined, readOnly: boolean): MountOptions {
  let flags = 0;
  let sawRw = false;
  const data: string[] = [];
  for (const raw of (text ?? '').split(',')) {
    const opt = raw.trim();
    if (opt === '') continue;
    if (REFUSED.has(opt)) throw new UsageError(`mount option ${JSON.stringify(opt)} is not supported here`);
    if (opt === 'rw') sawRw = true;
    const f = FLAG_OPTIONS[opt];
    if (f) flags = (flags | f[0]) & ~f[1];
    else data.push(opt);
  }
  if (readOnly) {
    if (sawRw) throw new UsageError('mount option "rw" contradicts a read-only attach (-r)');
    flags |= MS.RDONLY;
  }
  return { flags, data: data.join(',') };
}

type AsyncFn = { async: (...args: unknown[]) => void };
interface Bindings {
  mount: AsyncFn;
  umount2: AsyncFn;
}
let bindings: Bindings | undefined;

function lib(): Bindings {
  if (!bindings) {
    const c = koffi.load('libc.so.6');
    bindings = {
      mount: c.func('int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data)') as unknown as AsyncFn,
      umount2: c.func('int umount2(const char *target, int flags)') as unknown as AsyncFn,
    };
  }
  return bindings;
}

function callAsync(fn: AsyncFn, name: string, args: unknown[]): Promise<void> {
  return new Promise((resolve, reject) => {
    fn.async(...args, (err: unknown, r: number) => {
      if (err) reject(err);
      // koffi restores the worker thread's errno around this callback.
      else if (r < 0) reject(new SyscallError(name, koffi.errno()));
      else resolve();
    });
  });
}

/** mount(2) `source` on `target` as `fstype`. */
export function mountFilesystem(source: string, target: string, fstype: string, opts: MountOptions): Promise<void> {
  return callAsync(lib().mount, `mount(${source} on ${target})`, [source, target, fstype, opts.flags, opts.data === '' ? null : opts.data]);
}

/** umount2(2); MNT_DETACH for a lazy unmount. */
export function unmountFilesystem(target: string, flags = 0): Promise<void> {
  return callAsync(lib().umount2, `umount2(${target})`, [target, flags | UMOUNT_NOFOLLOW]);
}
