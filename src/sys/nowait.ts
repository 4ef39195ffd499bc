// preadv2(RWF_NOWAIT): read on the calling thread only when the data is already in the page
// cache, failing with EAGAIN otherwise. A cached 4 KiB read then costs well under a
// microsecond instead of a round trip through libuv's thread pool, and a read that would wait
// for the disk is still handed to the pool, so the event loop never blocks on I/O.

import { readSync, statfsSync } from 'node:fs';
import koffi from 'koffi';
import { isMemoryFilesystem } from './fs-magic.js';

/** include/uapi/linux/fs.h */
const RWF_NOWAIT = 0x00000008;

type Preadv2 = (fd: number, iov: Buffer, iovcnt: number, offset: number, flags: number) => number;

interface Nowait {
  readonly preadv2: Preadv2;
  /** One struct iovec { void *base; size_t len; }, reused: calls are synchronous. */
  readonly iov: Buffer;
}

let bound: Nowait | null | undefined;

function bind(): Nowait | null {
  if (bound !== undefined) return bound;
  try {
    const lib = koffi.load('libc.so.6');
    const preadv2 = lib.func('int64_t preadv2(int fd, void *iov, int iovcnt, int64_t offset, int flags)') as unknown as Preadv2;
    bound = { preadv2, iov: Buffer.alloc(16) };
  } catch {
    bound = null;
  }
  return bound;
}

/**
 * What a no-wait read did: 'later' when the data is not (all) cached, the read is short at end
 * of file or it failed (read the ordinary way); 'unsupported' when the file system cannot read
 * without waiting at all (tmpfs on older kernels): stop trying.
 */
export type NowaitResult = 'done' | 'later' | 'unsupported';

/** Linux's errno for a file system without no-wait reads. */
const EOPNOTSUPP = (koffi.os.errno as Record<string, number>).EOPNOTSUPP;

/**
 * Fill `buf` from `offset` if that can be done without waiting for the disk. Anything but 'done'
 * (having maybe filled part of `buf`) means the caller must do an ordinary read instead.
 */
export function tryPreadNowait(fd: number, buf: Buffer, offset: number): NowaitResult {
  const b = bound === undefined ? bind() : bound;
  if (b === null) return 'unsupported';
  if (buf.length === 0) return 'later';
  // The address of a Buffer's memory is stable while the Buffer is referenced (V8 never moves
  // ArrayBuffer backing stores), and `buf` is referenced for the whole synchronous call.
  b.iov.writeBigUInt64LE(BigInt(koffi.address(buf) as unknown as bigint), 0);
  b.iov.writeBigUInt64LE(BigInt(buf.length), 8);
  const n = b.preadv2(fd, b.iov, 1, offset, RWF_NOWAIT);
  if (n === buf.length) return 'done';
  return n < 0 && koffi.errno() === EOPNOTSUPP ? 'unsupported' : 'later';
}

/** tryPreadNowait as a yes/no: true when `buf` was filled. */
export function preadNowait(fd: number, buf: Buffer, offset: number): boolean {
  return tryPreadNowait(fd, buf, offset) === 'done';
}

/** The file system of an open file is memory-backed (checked through its /proc/self/fd link). */
function inMemory(fd: number): boolean {
  try {
    return isMemoryFilesystem(Number(statfsSync(`/proc/self/fd/${fd}`).type));
  } catch {
    return false;
  }
}

/** An ordinary read of a file in memory; a short one or an error is left to the ordinary path. */
function readHere(fd: number, buf: Buffer, offset: number): boolean {
  try {
    return readSync(fd, buf, 0, buf.length, offset) === buf.length;
  } catch {
    return false;
  }
}

/**
 * No-wait reads of one file. A file system that refuses them (tmpfs, even on Linux 6.18) costs
 * one refused call: after that, a file in memory (tmpfs, ramfs) is read here with an ordinary
 * read, which only copies pages (it could wait only for pages the kernel swapped out), and any
 * other file is left to the thread pool.
 */
export class NowaitReader {
  private mode: 'nowait' | 'memory' | 'off' = 'nowait';

  constructor(private readonly fd: number) {}

  read(buf: Buffer, offset: number): boolean {
    if (this.mode === 'memory') return readHere(this.fd, buf, offset);
    if (this.mode === 'off') return false;
    const r = tryPreadNowait(this.fd, buf, offset);
    if (r !== 'unsupported') return r === 'done';
    this.mode = inMemory(this.fd) ? 'memory' : 'off';
    return this.read(buf, offset);
  }
}
