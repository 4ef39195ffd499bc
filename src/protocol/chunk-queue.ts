// Incoming bytes as a queue of chunks. consume(n) returns a view when the bytes lie in one
// chunk and copies only when they straddle chunks (ws's receiver does the same), so a
// stream of small requests costs no copies at all.

export class ChunkQueue {
  private chunks: Buffer[] = [];
  private head = 0; // read position inside chunks[0]
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** Remove and return the next `n` bytes (n <= length). */
  consume(n: number): Buffer {
    if (n > this.total) throw new RangeError(`consume(${n}) with only ${this.total} bytes queued`);
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    const avail = first.length - this.head;
    if (n <= avail) {
      const view = first.subarray(this.head, this.head + n);
      this.advance(n);
      return view;
    }
    const out = Buffer.allocUnsafe(n);
    this.copyOut(out, 0, n);
    return out;
  }

  /** True when the next `n` bytes lie in one chunk, so consume(n) returns a view and copies nothing. */
  contiguous(n: number): boolean {
    return this.chunks.length > 0 && this.chunks[0]!.length - this.head >= n;
  }

  /** Copy the next `n` bytes into `dst` at `dstPos`, removing them. */
  copyOut(dst: Buffer, dstPos: number, n: number): void {
    if (n > this.total) throw new RangeError(`copyOut(${n}) with only ${this.total} bytes queued`);
    let done = 0;
    while (done < n) {
      const chunk = this.chunks[0]!;
      const take = Math.min(n - done, chunk.length - this.head);
      chunk.copy(dst, dstPos + done, this.head, this.head + take);
      this.advance(take);
      done += take;
    }
  }

  /** Drop up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    const drop = Math.min(n, this.total);
    let left = drop;
    while (left > 0) {
      const chunk = this.chunks[0]!;
      const take = Math.min(left, chunk.length - this.head);
      this.advance(take);
      left -= take;
    }
    return drop;
  }

  /** Read a big-endian u32 at `pos` bytes ahead without consuming (pos + 4 <= length). */
  peekU32(pos: number): number {
    let value = 0;
    for (let i = 0; i < 4; i++) value = value * 256 + this.peekByte(pos + i);
    return value;
  }

  private peekByte(pos: number): number {
    let p = pos + this.head;
    for (const chunk of this.chunks) {
      if (p < chunk.length) return chunk[p]!;
      p -= chunk.length;
    }
    throw new RangeError(`peek past the end of the queue`);
  }

  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.total = 0;
  }

  private advance(n: number): void {
    this.head += n;
    this.total -= n;
    if (this.head === this.chunks[0]!.length) {
      this.chunks.shift();
      this.head = 0;
    }
  }
}
