// The few Linux syscalls Node does not expose, reached through koffi: lseek with
// SEEK_DATA/SEEK_HOLE (lseek(2)), fallocate(2) and the block-device ioctls of linux/fs.h.
// libc is loaded on first use so that importing a driver costs nothing on paths that never
// need it. Calls that can block for long (fallocate, discard, zero-out) run on the libuv
// thread pool through koffi's `.async`; lseek is quick and stays synchronous.

import koffi from 'koffi';
import { SyscallError } from './errno.js';
import { BLKDISCARD, BLKGETSIZE64, BLKPBSZGET, BLKSSZGET, BLKZEROOUT } from './ioctl-numbers.js';

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

/** linux/falloc.h */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/**
 * koffi refuses new async calls beyond its queue limit (max_async_calls, 256 by default), so
 * at most this many are handed to it at once and the rest wait here.
 */
const MAX_ASYNC_IN_FLIGHT = 64;

type AsyncFn = { async: (...args: unknown[]) => void };
type SyncFn = (...args: unknown[]) => number;

/** linux/fadvise.h */
export const POSIX_FADV_WILLNEED = 3;

interface Bindings {
  lseek: SyncFn;
  fallocate: SyncFn & AsyncFn;
  fadvise: AsyncFn;
  syncFileRange: AsyncFn;
  ioctlPtr: SyncFn & AsyncFn;
  isatty: SyncFn;
}

class Libc {
  private readonly b: Bindings;
  private inFlight = 0;
  private readonly waiting: Array<() => void> = [];

  constructor() {
    const lib = koffi.load('libc.so.6');
    // ioctl is variadic; koffi cannot call variadic functions asynchronously, so it is declared
    // with a fixed pointer third argument, which has the same calling convention for integer
    // and pointer arguments on the Linux ABIs we support (x86_64 SysV, AAPCS64).
    this.b = {
      lseek: lib.func('int64_t lseek(int fd, int64_t offset, int whence)') as unknown as SyncFn,
      fallocate: lib.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)') as unknown as SyncFn & AsyncFn,
      fadvise: lib.func('int posix_fadvise(int fd, int64_t offset, int64_t len, int advice)') as unknown as AsyncFn,
      syncFileRange: lib.func('int sync_file_range(int fd, int64_t offset, int64_t nbytes, unsigned int flags)') as unknown as AsyncFn,
      ioctlPtr: lib.func('int ioctl(int fd, unsigned long request, void *arg)') as unknown as SyncFn & AsyncFn,
      isatty: lib.func('int isatty(int fd)') as unknown as SyncFn,
    };
  }

  lseek(fd: number, offset: number, whence: number): number {
    const r = this.b.lseek(fd, offset, whence);
    if (r < 0) throw new SyscallError('lseek', koffi.errno());
    return r;
  }

  ioctlSync(fd: number, request: number, arg: Buffer, name: string): number {
    const r = this.b.ioctlPtr(fd, request, arg);
    if (r < 0) throw new SyscallError(name, koffi.errno());
    return r;
  }

  /**
   * Run `fn.async(...args)` off the main thread; resolves with the return value, rejects with
   * errno when it is negative (or, with `returnsErrno`, with the returned error number itself,
   * as posix_fadvise reports errors).
   */
  async callAsync(fn: AsyncFn, name: string, args: unknown[], returnsErrno = false): Promise<number> {
    if (this.inFlight >= MAX_ASYNC_IN_FLIGHT) await new Promise<void>((resolve) => this.waiting.push(resolve));
    this.inFlight++;
    try {
      return await new Promise<number>((resolve, reject) => {
        fn.async(...args, (err: unknown, r: number) => {
          if (err) reject(err);
          // koffi restores the worker thread's errno around this callback.
          else if (returnsErrno && r > 0) reject(new SyscallError(name, r));
          else if (r < 0) reject(new SyscallError(name, koffi.errno()));
          else resolve(r);
        });
      });
    } finally {
      this.inFlight--;
      this.waiting.shift()?.();
    }
  }

  get bindings(): Bindings {
    return this.b;
  }
}

let instance: Libc | undefined;

function libc(): Libc {
  instance ??= new Libc();
  return instance;
}

/**
 * lseek(fd, offset, SEEK_DATA): the first data byte at or after `offset`, or null when there is
 * no data past `offset` (ENXIO). Other errors (EINVAL: the filesystem lacks SEEK_DATA) throw.
 */
export function seekData(fd: number, offset: number): number | null {
  return seekOrNull(fd, offset, SEEK_DATA);
}

/** lseek(fd, offset, SEEK_HOLE): the first hole at or after `offset` (EOF counts), null on ENXIO. */
export function seekHole(fd: number, offset: number): number | null {
  return seekOrNull(fd, offset, SEEK_HOLE);
}

function seekOrNull(fd: number, offset: number, whence: number): number | null {
  try {
    return libc().lseek(fd, offset, whence);
  } catch (e) {
    if ((e as SyscallError).code === 'ENXIO') return null;
    throw e;
  }
}

/**
 * Whether `fd` is a terminal, without process.stderr.isTTY: creating that stream loads node's
 * tty, net and stream modules (~5 ms of a command that prints nothing).
 */
export function isTerminal(fd: number): boolean {
  return libc().bindings.isatty(fd) === 1;
}

/** fallocate(2) here and now, for calls known to be quick. Errors carry `code` as below. */
export function fallocateSync(fd: number, mode: number, offset: number, length: number): void {
  const l = libc();
  if (l.bindings.fallocate(fd, mode, offset, length) < 0) throw new SyscallError('fallocate', koffi.errno());
}

/** fallocate(2) on the thread pool. Errors carry `code` ('EOPNOTSUPP' when the filesystem cannot). */
export async function fallocate(fd: number, mode: number, offset: number, length: number): Promise<void> {
  const l = libc();
  await l.callAsync(l.bindings.fallocate, 'fallocate', [fd, mode, offset, length]);
}

/** posix_fadvise(fd, offset, length, POSIX_FADV_WILLNEED) on the thread pool: start reading ahead. */
export async function adviseWillNeed(fd: number, offset: number, length: number): Promise<void> {
  const l = libc();
  await l.callAsync(l.bindings.fadvise, 'posix_fadvise', [fd, offset, length, POSIX_FADV_WILLNEED], true);
}

/** linux/fs.h: SYNC_FILE_RANGE_WRITE, start writeback of dirty pages without waiting for it. */
const SYNC_FILE_RANGE_WRITE = 2;

/** sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) on the thread pool: start writing the whole file back. */
export async function startWriteback(fd: number): Promise<void> {
  const l = libc();
  await l.callAsync(l.bindings.syncFileRange, 'sync_file_range', [fd, 0, 0, SYNC_FILE_RANGE_WRITE]);
}

/** BLKGETSIZE64: size of a block device in bytes. */
export function blockDeviceSize(fd: number): number {
  const out = Buffer.alloc(8);
  libc().ioctlSync(fd, BLKGETSIZE64, out, 'ioctl(BLKGETSIZE64)');
  const v = out.readBigUInt64LE(0);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new SyscallError('ioctl(BLKGETSIZE64)', 75 /* EOVERFLOW */);
  return Number(v);
}

/** BLKSSZGET: logical sector size (the smallest unit the device addresses). */
export function blockDeviceLogicalSectorSize(fd: number): number {
  const out = Buffer.alloc(4);
  libc().ioctlSync(fd, BLKSSZGET, out, 'ioctl(BLKSSZGET)');
  return out.readInt32LE(0);
}

/** BLKPBSZGET: physical sector size (the unit the device writes without read-modify-write). */
export function blockDevicePhysicalSectorSize(fd: number): number {
  const out = Buffer.alloc(4);
  libc().ioctlSync(fd, BLKPBSZGET, out, 'ioctl(BLKPBSZGET)');
  return out.readUInt32LE(0);
}

function rangeArg(offset: number, length: number): Buffer {
  const arg = Buffer.alloc(16);
  arg.writeBigUInt64LE(BigInt(offset), 0);
  arg.writeBigUInt64LE(BigInt(length), 8);
  return arg;
}

/** BLKDISCARD on the thread pool; offset and length must be multiples of the logical sector size. */
export async function blockDeviceDiscard(fd: number, offset: number, length: number): Promise<void> {
  const l = libc();
  await l.callAsync(l.bindings.ioctlPtr, 'ioctl(BLKDISCARD)', [fd, BLKDISCARD, rangeArg(offset, length)]);
}

/** BLKZEROOUT on the thread pool; the kernel falls back to writing zeros itself and never unmaps. */
export async function blockDeviceZeroOut(fd: number, offset: number, length: number): Promise<void> {
  const l = libc();
  await l.callAsync(l.bindings.ioctlPtr, 'ioctl(BLKZEROOUT)', [fd, BLKZEROOUT, rangeArg(offset, length)]);
}
