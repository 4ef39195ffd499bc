// Zero-copy read replies: sendfile(2) moves file bytes from the page cache to a socket without
// passing through user space, where pread + write would copy every byte twice. Both calls are
// non-blocking on the socket side (it is O_NONBLOCK); the file side would block on a page
// cache miss, so cachestat(2) (Linux 6.5) first checks that every page of the range is cached.
// Without cachestat nothing here is used and the server copies as before.

import koffi from 'koffi';
import { SyscallError } from './errno.js';

/** asm-generic/unistd.h and arch/x86/entry/syscalls: the same number on every architecture. */
const SYS_CACHESTAT = 451;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;
const MSG_MORE = 0x8000;
const EAGAIN = 11;
const EINTR = 4;

type Call = (...args: unknown[]) => number;

interface Bindings {
  readonly sendfile: Call;
  readonly send: Call;
  readonly cachestat: Call;
  /** struct cachestat_range { u64 off, len }; reused: calls are synchronous. */
  readonly range: Buffer;
  /** struct cachestat: five u64 counters, nr_cache first. */
  readonly stat: Buffer;
  /** The in/out file offset of sendfile. */
  readonly offset: Buffer;
  readonly pageBytes: number;
}

let bound: Bindings | null | undefined;

function bind(): Bindings | null {
  if (bound !== undefined) return bound;
  bound = null;
  try {
    const lib = koffi.load('libc.so.6');
    // syscall(2) is variadic; it is written in assembly and reads its arguments from the
    // registers a fixed prototype fills the same way (as libc.ts does for ioctl).
    const cachestat = lib.func('long syscall(long nr, int fd, void *range, void *stat, unsigned int flags)') as unknown as Call;
    const sysconf = lib.func('long sysconf(int name)') as unknown as Call;
    const b: Bindings = {
      sendfile: lib.func('int64_t sendfile(int out_fd, int in_fd, void *offset, size_t count)') as unknown as Call,
      send: lib.func('int64_t send(int fd, void *buf, size_t len, int flags)') as unknown as Call,
      cachestat,
      range: Buffer.alloc(16),
      stat: Buffer.alloc(40),
      offset: Buffer.alloc(8),
      pageBytes: sysconf(30 /* _SC_PAGESIZE */),
    };
    // Probe once: an old kernel answers ENOSYS, and then the copying path is all there is.
    const probe = b.cachestat(SYS_CACHESTAT, -1, b.range, b.stat, 0);
    if (probe < 0 && koffi.errno() === 38 /* ENOSYS */) return null;
    bound = b;
  } catch {
    // No libc to load: stay on the copying path.
  }
  return bound;
}

/** True when zero-copy sends can be used on this system at all. */
export function zeroCopyAvailable(): boolean {
  return (bound === undefined ? bind() : bound) !== null;
}

/** Every page of [offset, offset+length) of `fd` is in the page cache (so sendfile will not wait for the disk). */
export function rangeCached(fd: number, offset: number, length: number): boolean {
  const b = bound === undefined ? bind() : bound;
  if (b === null || length <= 0) return false;
  const first = Math.floor(offset / b.pageBytes);
  const pages = Math.ceil((offset + length) / b.pageBytes) - first;
  b.range.writeBigUInt64LE(BigInt(offset), 0);
  b.range.writeBigUInt64LE(BigInt(length), 8);
  if (b.cachestat(SYS_CACHESTAT, fd, b.range, b.stat, 0) < 0) return false;
  return Number(b.stat.readBigUInt64LE(0)) >= pages;
}

/**
 * send(2) without waiting: the bytes of `buf` the socket took (0 when it is full). `more` says
 * data follows at once (MSG_MORE), so a header and its payload leave in one segment.
 */
export function sendNow(sockFd: number, buf: Buffer, more: boolean): number {
  const b = bound ?? bind();
  if (b === null) return 0;
  for (;;) {
    const n = b.send(sockFd, buf, buf.length, MSG_DONTWAIT | MSG_NOSIGNAL | (more ? MSG_MORE : 0));
    if (n >= 0) return n;
    const errno = koffi.errno();
    if (errno === EINTR) continue;
    if (errno === EAGAIN) return 0;
    throw new SyscallError('send', errno);
  }
}

/** sendfile(2) of [offset, offset+length) of `fileFd` to a non-blocking socket: bytes sent (0 when full). */
export function sendFileNow(sockFd: number, fileFd: number, offset: number, length: number): number {
  const b = bound ?? bind();
  if (b === null) return 0;
  b.offset.writeBigInt64LE(BigInt(offset), 0);
  for (;;) {
    const n = b.sendfile(sockFd, fileFd, b.offset, length);
    if (n >= 0) return n;
    const errno = koffi.errno();
    if (errno === EINTR) continue;
    if (errno === EAGAIN) return 0;
    throw new SyscallError('sendfile', errno);
  }
}
