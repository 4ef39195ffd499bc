// Zero-copy write payloads: splice(2) moves the bytes of a large NBD write from the socket into
// a pipe by reference (a unix socket keeps most of a large message in whole pages, which the
// pipe takes over), and from the pipe into the file's page cache with one copy, where reading
// the payload into memory and pwrite-ing it copies every byte twice. Both moves are made on
// the calling thread, one after the other, so one pipe serves the whole process and is left
// empty between calls.

import koffi from 'koffi';
import { SyscallError } from './errno.js';

/** fcntl.h */
const F_SETPIPE_SZ = 1031;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
/** linux/splice.h */
const SPLICE_F_MOVE = 1;
const SPLICE_F_NONBLOCK = 2;
const EAGAIN = 11;
const EINTR = 4;
const EIO = 5;

/**
 * Pipe size asked for: the largest an unprivileged process gets by default
 * (/proc/sys/fs/pipe-max-size). Each piece of a socket buffer takes one of its 256 slots, so a
 * few MiB of a unix socket's queue move in one call.
 */
const PIPE_BYTES = 1024 * 1024;

type Call = (...args: unknown[]) => number;

interface Bindings {
  readonly splice: Call;
  readonly write: Call;
  readonly read: Call;
  readonly close: Call;
  readonly pipe2: Call;
  readonly fcntl: Call;
  /** loff_t for splice's file offset; reused: calls are synchronous. */
  readonly offset: Buffer;
}

/** Bytes written to files through the pipe since the process started (for tests and diagnostics). */
export const spliceStats = { bytesToFile: 0 };

let bound: Bindings | null | undefined;

function bind(): Bindings | null {
  if (bound !== undefined) return bound;
  try {
    const lib = koffi.load('libc.so.6');
    bound = {
      splice: lib.func('int64_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t len, unsigned int flags)') as unknown as Call,
      write: lib.func('int64_t write(int fd, void *buf, size_t count)') as unknown as Call,
      read: lib.func('int64_t read(int fd, void *buf, size_t count)') as unknown as Call,
      close: lib.func('int close(int fd)') as unknown as Call,
      pipe2: lib.func('int pipe2(void *fds, int flags)') as unknown as Call,
      fcntl: lib.func('int fcntl(int fd, int cmd, int arg)') as unknown as Call,
      offset: Buffer.alloc(8),
    };
  } catch {
    bound = null;
  }
  return bound;
}

/** What fromSocket found: bytes moved, nothing to read yet, or the end of the stream. */
export type FromSocket = number | 'wait' | 'eof';

export class SplicePipe {
  /** Bytes in the pipe, not yet written to a file. */
  private held = 0;

  private constructor(
    private readonly b: Bindings,
    private readFd: number,
    private writeFd: number,
  ) {}

  /** A pipe with the calls to use it, or null when this system has neither. */
  static create(): SplicePipe | null {
    const b = bind();
    if (b === null) return null;
    const fds = Buffer.alloc(8);
    if (b.pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) return null;
    const [r, w] = [fds.readInt32LE(0), fds.readInt32LE(4)];
    // Best effort: a smaller pipe only moves less per call.
    b.fcntl(w, F_SETPIPE_SZ, PIPE_BYTES);
    return new SplicePipe(b, r, w);
  }

  get bytesHeld(): number {
    return this.held;
  }

  /** Closed for good (see discard); splicePipe() makes another. */
  get closed(): boolean {
    return this.readFd < 0;
  }

  /**
   * Move up to `max` bytes of the non-blocking socket `sockFd` into the pipe, which must be
   * empty: then 'wait' can only mean that the socket has nothing to read.
   */
  fromSocket(sockFd: number, max: number): FromSocket {
    if (this.held !== 0) throw new Error('fromSocket into a pipe that still holds bytes');
    for (;;) {
      const n = this.b.splice(sockFd, null, this.writeFd, null, max, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) {
        this.held += n;
        return n;
      }
      if (n === 0) return 'eof';
      const errno = koffi.errno();
      if (errno === EINTR) continue;
      if (errno === EAGAIN) return 'wait';
      throw new SyscallError('splice', errno);
    }
  }

  /** Copy bytes already read from the socket into the pipe: bytes taken (fewer when it fills up). */
  fromMemory(buf: Buffer): number {
    for (;;) {
      const n = this.b.write(this.writeFd, buf, buf.length);
      if (n >= 0) {
        this.held += n;
        return n;
      }
      const errno = koffi.errno();
      if (errno === EINTR) continue;
      if (errno === EAGAIN) return 0;
      throw new SyscallError('write', errno);
    }
  }

  /** Write everything the pipe holds to `fd` at `offset`; returns the byte count. */
  toFile(fd: number, offset: number): number {
    const total = this.held;
    let pos = offset;
    while (this.held > 0) {
      this.b.offset.writeBigInt64LE(BigInt(pos), 0);
      const n = this.b.splice(this.readFd, null, fd, this.b.offset, this.held, SPLICE_F_MOVE);
      if (n > 0) {
        this.held -= n;
        pos += n;
        spliceStats.bytesToFile += n;
        continue;
      }
      const errno = n === 0 ? EIO : koffi.errno();
      if (errno === EINTR) continue;
      throw new SyscallError('splice', errno);
    }
    return total;
  }

  /** Drop what the pipe holds (after a failed write, or a connection gone mid-payload). */
  discard(): void {
    if (this.held === 0) return;
    const scratch = Buffer.allocUnsafe(64 * 1024);
    while (this.held > 0) {
      const n = this.b.read(this.readFd, scratch, Math.min(scratch.length, this.held));
      if (n > 0) {
        this.held -= n;
        continue;
      }
      if (n < 0 && koffi.errno() === EINTR) continue;
      // The pipe and the count disagree: retire it; the next write gets a new one.
      this.close();
      return;
    }
  }

  private close(): void {
    this.b.close(this.readFd);
    this.b.close(this.writeFd);
    this.readFd = -1;
    this.writeFd = -1;
    this.held = 0;
  }
}

let shared: SplicePipe | null | undefined;

/** The process's pipe for spliced writes (empty); null when splice(2) cannot be used here. */
export function splicePipe(): SplicePipe | null {
  if (shared === undefined || shared?.closed === true) shared = SplicePipe.create();
  return shared;
}
