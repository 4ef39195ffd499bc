// Reusable read buffers, so that a stream of reads of the common sizes allocates nothing.
// Each buffer carries `headroom` bytes in front of the data, where the reply header (simple
// reply, or structured chunk header + offset) is written: a reply then goes out as one
// buffer with no copy and no concatenation.
//
// Size classes are powers of two from 512 B to 4 MiB of data; larger reads get a one-off
// buffer. The pool keeps at most `maxPooledBytes` idle, so memory stays bounded however many
// reads were once in flight.

/** Room for the largest fixed reply prefix: 20-byte chunk header + 8-byte offset. */
export const REPLY_HEADROOM = 32;

const MIN_CLASS_BITS = 9;
const MAX_CLASS_BITS = 22;

export class BufferPool {
  private readonly free: Buffer[][] = [];
  private idleBytes = 0;
  private readonly maxPooledBytes: number;

  constructor(maxPooledBytes = 64 * 1024 * 1024) {
    this.maxPooledBytes = maxPooledBytes;
    for (let i = MIN_CLASS_BITS; i <= MAX_CLASS_BITS; i++) this.free.push([]);
  }

  /** A buffer of at least REPLY_HEADROOM + dataBytes bytes; contents are not zeroed. */
  acquire(dataBytes: number): Buffer {
    const cls = classOf(dataBytes);
    if (cls < 0) return Buffer.allocUnsafeSlow(REPLY_HEADROOM + dataBytes);
    const list = this.free[cls]!;
    const b = list.pop();
    if (b !== undefined) {
      this.idleBytes -= b.length;
      return b;
    }
    return Buffer.allocUnsafeSlow(REPLY_HEADROOM + (1 << (cls + MIN_CLASS_BITS)));
  }

  /** Give back a buffer obtained from acquire() once nothing refers to it any more. */
  release(b: Buffer): void {
    const data = b.length - REPLY_HEADROOM;
    const cls = classOf(data);
    // Only exact class sizes come back: one-off buffers are left to the GC.
    if (cls < 0 || 1 << (cls + MIN_CLASS_BITS) !== data) return;
    if (this.idleBytes + b.length > this.maxPooledBytes) return;
    this.free[cls]!.push(b);
    this.idleBytes += b.length;
  }
}

function classOf(dataBytes: number): number {
  if (dataBytes > 1 << MAX_CLASS_BITS) return -1;
  let bits = MIN_CLASS_BITS;
  while (1 << bits < dataBytes) bits++;
  return bits - MIN_CLASS_BITS;
}
