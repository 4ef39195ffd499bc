// preadv2(RWF_NOWAIT): read on the calling thread only when the data is already in the page
// cache, failing with EAGAIN otherwise. A cached 4 KiB read then costs well under a
// microsecond instead of a round trip through libuv's thread pool, and a read that would wait
// for the disk is still handed to the pool, so the event loop never blocks on I/O.

import koffi from 'koffi';

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
 * Fill `buf` from `offset` if that can be done without waiting for the disk. Returns false
 * (having maybe filled part of `buf`) when the caller must do an ordinary read instead:
 * data not cached, a short read at end of file, or no preadv2 on this system.
 */
export function preadNowait(fd: number, buf: Buffer, offset: number): boolean {
  const b = bound === undefined ? bind() : bound;
  if (b === null || buf.length === 0) return false;
  // The address of a Buffer's memory is stable while the Buffer is referenced (V8 never moves
  // ArrayBuffer backing stores), and `buf` is referenced for the whole synchronous call.
  b.iov.writeBigUInt64LE(BigInt(koffi.address(buf) as unknown as bigint), 0);
  b.iov.writeBigUInt64LE(BigInt(buf.length), 8);
  return b.preadv2(fd, b.iov, 1, offset, RWF_NOWAIT) === buf.length;
}
