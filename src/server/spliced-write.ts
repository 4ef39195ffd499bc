// One NBD write whose payload goes from the socket to the image file through a pipe
// (sys/splice.ts), never through user memory. The connection stops its stream's reads at the
// header; what the socket holds is then moved into the pipe and at once from the pipe into the
// file, and when the payload is not all there yet the stream reads a single byte of it to learn
// that more has come (that byte goes into the pipe first, so the order holds). A write the file
// refuses (ENOSPC, EIO) still takes the rest of its payload off the socket, so that the stream
// stays in step, and is answered with the error.
//
// The copy into the file is made on the event loop rather than the thread pool: it is one page
// cache copy, the one that pwrite would make on the pool, and a pool round trip per payload
// costs more than the copy here (25-35 us each on a 2-core VM, against ~25 us to copy 256 KiB).

import type { HostRun } from '../block/device.js';
import type { SplicePipe } from '../sys/splice.js';

export type SpliceProgress = 'done' | 'wait' | 'eof';

export class SplicedWrite {
  /** Payload bytes not yet taken from the stream. */
  private remaining: number;
  private fileOffset: number;
  private readonly fd: number;
  /** Why the file refused the payload; the rest is dropped as it arrives. */
  private failure: unknown = null;

  constructor(
    readonly cookie: bigint,
    readonly length: number,
    readonly fua: boolean,
    private readonly pipe: SplicePipe,
    target: HostRun,
  ) {
    this.remaining = length;
    this.fileOffset = target.offset;
    this.fd = target.fd;
  }

  /** Payload bytes still in the stream. */
  get remainingBytes(): number {
    return this.remaining;
  }

  /** The file's error, once advance() said 'done'; null when the payload is all in the file. */
  get error(): unknown {
    return this.failure;
  }

  /** Payload bytes already read from the stream (those read with the header, a wake-up byte). */
  take(buf: Buffer): void {
    let at = 0;
    while (at < buf.length) {
      const n = this.pipe.fromMemory(at === 0 ? buf : buf.subarray(at));
      if (n === 0 && this.pipe.bytesHeld === 0) throw new Error('the splice pipe takes nothing');
      at += n;
      this.remaining -= n;
      this.flush();
    }
  }

  /** Move what the socket holds into the file: 'wait' when the payload is not all there yet. Throws on socket errors. */
  advance(sockFd: number): SpliceProgress {
    while (this.remaining > 0) {
      const r = this.pipe.fromSocket(sockFd, this.remaining);
      if (r === 'wait' || r === 'eof') return r;
      this.remaining -= r;
      this.flush();
    }
    return 'done';
  }

  /** The payload will not all come (the connection is going): leave the shared pipe empty. */
  abandon(): void {
    this.pipe.discard();
  }

  private flush(): void {
    if (this.pipe.bytesHeld === 0) return;
    if (this.failure !== null) {
      this.pipe.discard();
      return;
    }
    try {
      this.fileOffset += this.pipe.toFile(this.fd, this.fileOffset);
    } catch (e) {
      this.failure = e;
      this.pipe.discard();
    }
  }
}
