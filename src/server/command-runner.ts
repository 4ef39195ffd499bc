// Running a validated transmission request against its export and answering it: reads (from
// the page cache on this thread, from the thread pool, with sendfile(2) straight from the page
// cache, or sparse with OFFSET_HOLE chunks), block status, and the commands answered by a bare
// OK or an error. The connection decides what runs; this decides how it is answered.

import type { Backend } from '../block/backend.js';
import { EXTENT_ZERO, type WriteOptions } from '../block/device.js';
import { RequestError, toNbdErrno } from '../errors.js';
import { NBD_CMD } from '../protocol/constants.js';
import type { BlockDescriptor } from '../protocol/transmission.js';
import { rangeCached } from '../sys/sendfile.js';
import { REPLY_HEADROOM, type BufferPool } from './buffer-pool.js';
import type { Logger } from './logger.js';
import type { MetaContext } from './meta-context.js';
import type { ReadSegment, ReplyWriter } from './replies.js';
import { commandName } from './validate.js';

/**
 * Writes up to this long may be made on this thread (BlockDevice.writeNow): copying 64 KiB into
 * the page cache takes some 20 microseconds, less than a round trip through the thread pool,
 * and longer ones would hold up every other connection of the thread meanwhile.
 */
const WRITE_NOW_MAX_BYTES = 64 * 1024;
/** At most this many descriptors per block status chunk (the spec's ceiling is 2^20). */
const MAX_DESCRIPTORS = 1 << 16;

/** What the runner needs of its connection. */
export interface RunnerConnection {
  readonly id: number;
  readonly pool: BufferPool;
  readonly logger: Logger;
  readonly replies: ReplyWriter;
  /** Replies can still be sent. */
  writable(): boolean;
  /** The socket's descriptor for sendfile(2); -1 when replies must go through the stream (TLS). */
  sockFd(): number;
  /** Bytes written to the stream that the kernel has not taken yet. */
  queuedBytes(): number;
  /** Call `done` once everything written to the stream so far has gone to the kernel. */
  afterQueue(done: () => void): void;
  /** The request is over, answered or not; `bytes` as counted when it started. */
  finish(bytes: number): void;
}

export interface RunnerOptions {
  readonly structured: boolean;
  readonly contexts: readonly MetaContext[];
  /** Reads at least this long go out with sendfile(2) where they can. */
  readonly zeroCopyMinBytes: number;
  /** Structured reads at least this long are sent sparse. */
  readonly sparseReadMinBytes: number;
}

export class CommandRunner {
  private readonly structured: boolean;
  private readonly contexts: readonly MetaContext[];
  private readonly zeroCopyMinBytes: number;
  private readonly sparseReadMinBytes: number;
  /** Zero-copy reads waiting for the stream's queue to empty. */
  private flushWaiters: (() => void)[] = [];

  constructor(
    private readonly conn: RunnerConnection,
    private readonly backend: Backend,
    opts: RunnerOptions,
  ) {
    this.structured = opts.structured;
    this.contexts = opts.contexts;
    this.zeroCopyMinBytes = opts.zeroCopyMinBytes;
    this.sparseReadMinBytes = opts.sparseReadMinBytes;
  }

  /** NBD_CMD_READ; `df`: the client forbids fragmenting the reply (NBD_CMD_FLAG_DF). */
  read(cookie: bigint, offset: number, length: number, df: boolean): void {
    if (this.structured && !df && length >= this.sparseReadMinBytes) void this.runSparseRead(cookie, offset, length);
    else if (this.zeroCopyable(length)) void this.runFileRead(cookie, offset, length);
    else if (!this.readNow(cookie, offset, length)) void this.runRead(cookie, offset, length);
  }

  /**
   * NBD_CMD_WRITE of a payload in memory. A small write the export can make here and now
   * (BlockDevice.writeNow) is answered in the same turn, its reply sent with the others of that
   * turn; anything else goes through pwrite. `pooled` goes back to the pool once written.
   * True: written already, nothing refers to `payload` any more.
   */
  write(cookie: bigint, offset: number, payload: Buffer, opts: WriteOptions | undefined, pooled?: Buffer): boolean {
    if (payload.length <= WRITE_NOW_MAX_BYTES && this.backend.writeNow(payload, offset, opts)) {
      if (this.conn.writable()) this.conn.replies.simpleOk(cookie);
      if (pooled !== undefined) this.conn.pool.release(pooled);
      this.conn.finish(payload.length);
      return true;
    }
    void this.simple(cookie, NBD_CMD.WRITE, payload.length, this.backend.pwrite(payload, offset, opts), pooled);
    return false;
  }

  /** Answer a failed request with its NBD error. */
  failed(cookie: bigint, type: number, err: unknown): void {
    if (!this.conn.writable()) return;
    const errno = toNbdErrno(err);
    const message = err instanceof Error ? err.message : String(err);
    if (errno === 'EIO') this.conn.logger.error(`connection ${this.conn.id}: ${commandName(type)}: ${message}`);
    // RequestError messages are written for the client; anything else (a system error naming
    // host paths, say) stays in the log and the client gets the errno alone.
    this.conn.replies.error(cookie, errno, err instanceof RequestError ? message : `${commandName(type)} failed: ${errno}`, this.structured);
  }

  /** A command whose answer is OK once `op` resolves; `pooled` goes back to the pool then. */
  async simple(cookie: bigint, type: number, bytes: number, op: Promise<void>, pooled?: Buffer): Promise<void> {
    try {
      await op;
      if (this.conn.writable()) this.conn.replies.simpleOk(cookie);
    } catch (e) {
      this.failed(cookie, type, e);
    } finally {
      if (pooled !== undefined) this.conn.pool.release(pooled);
      this.conn.finish(bytes);
    }
  }

  private zeroCopyable(length: number): boolean {
    return this.conn.sockFd() >= 0 && length >= this.zeroCopyMinBytes;
  }

  /**
   * Bytes that sit unchanged in a host file and in its page cache leave with sendfile(2): no
   * copy through user space. The kernel must see them after everything queued on the stream,
   * so a congested socket is waited for (a couple of times at most, so that a stream of small
   * replies cannot starve the read). False: the copying paths must answer.
   */
  private async sendFile(cookie: bigint, offset: number, length: number): Promise<boolean> {
    if (!this.zeroCopyable(length)) return false;
    const run = this.backend.hostRun(offset, length);
    if (run === null || run.length !== length) return false;
    for (let waits = 0; this.conn.queuedBytes() > 0; waits++) {
      if (waits === 2 || !this.conn.writable()) return false;
      await this.queueFlushed();
    }
    if (!this.conn.writable() || !rangeCached(run.fd, run.offset, length)) return false;
    return this.conn.replies.fileData(cookie, offset, run, this.structured, this.conn.sockFd());
  }

  /** Resolves once everything written to the stream so far has gone to the kernel. */
  private queueFlushed(): Promise<void> {
    return new Promise((resolve) => {
      if (this.flushWaiters.push(resolve) === 1) this.conn.afterQueue(this.onQueueFlushed);
    });
  }

  private readonly onQueueFlushed = (): void => {
    const waiters = this.flushWaiters;
    this.flushWaiters = [];
    for (const w of waiters) w();
  };

  private async runFileRead(cookie: bigint, offset: number, length: number): Promise<void> {
    let sent: boolean;
    try {
      sent = await this.sendFile(cookie, offset, length);
    } catch (e) {
      this.failed(cookie, NBD_CMD.READ, e);
      this.conn.finish(length);
      return;
    }
    if (sent) this.conn.finish(length);
    else if (!this.readNow(cookie, offset, length)) await this.runRead(cookie, offset, length);
  }

  /** Cached data is read on this thread and answered in the same turn: no promise, no pool hop. */
  private readNow(cookie: bigint, offset: number, length: number): boolean {
    const pool = this.conn.pool;
    const buf = pool.acquire(length);
    if (!this.backend.readNow(buf.subarray(REPLY_HEADROOM, REPLY_HEADROOM + length), offset)) {
      pool.release(buf);
      return false;
    }
    if (this.conn.writable()) this.conn.replies.readData(cookie, offset, length, buf, this.structured);
    else pool.release(buf);
    this.conn.finish(length);
    return true;
  }

  private async runRead(cookie: bigint, offset: number, length: number): Promise<void> {
    const pool = this.conn.pool;
    const buf = pool.acquire(length);
    try {
      await this.backend.pread(buf.subarray(REPLY_HEADROOM, REPLY_HEADROOM + length), offset);
      if (this.conn.writable()) this.conn.replies.readData(cookie, offset, length, buf, this.structured);
      else pool.release(buf);
    } catch (e) {
      pool.release(buf);
      this.failed(cookie, NBD_CMD.READ, e);
    } finally {
      this.conn.finish(length);
    }
  }

  /** A structured read that reports the device's zero extents as OFFSET_HOLE chunks. */
  private async runSparseRead(cookie: bigint, offset: number, length: number): Promise<void> {
    const backend = this.backend;
    const pool = this.conn.pool;
    let buf: Buffer | undefined;
    try {
      const segments = await this.readSegments(offset, length);
      if (segments.length === 1 && !segments[0]!.hole && (await this.sendFile(cookie, offset, length))) return;
      buf = pool.acquire(length);
      const b = buf;
      if (segments.length === 1 && !segments[0]!.hole) {
        const view = b.subarray(REPLY_HEADROOM, REPLY_HEADROOM + length);
        if (!backend.readNow(view, offset)) await backend.pread(view, offset);
        buf = undefined;
        if (this.conn.writable()) this.conn.replies.readData(cookie, offset, length, b, true);
        else pool.release(b);
        return;
      }
      const reads: Promise<void>[] = [];
      for (const s of segments) {
        if (s.hole) continue;
        const at = REPLY_HEADROOM + (s.offset - offset);
        const view = b.subarray(at, at + s.length);
        if (!backend.readNow(view, s.offset)) reads.push(backend.pread(view, s.offset));
      }
      await Promise.all(reads);
      buf = undefined;
      if (this.conn.writable()) this.conn.replies.readSparse(cookie, offset, segments, b);
      else pool.release(b);
    } catch (e) {
      if (buf !== undefined) pool.release(buf);
      this.failed(cookie, NBD_CMD.READ, e);
    } finally {
      this.conn.finish(length);
    }
  }

  /** Data and zero segments covering [offset, offset+length); extents failing means all data. */
  private async readSegments(offset: number, length: number): Promise<ReadSegment[]> {
    const backend = this.backend;
    let extents;
    try {
      extents = await backend.extents(offset, length);
    } catch {
      // Holes are an optimisation: the read itself decides whether the request fails.
      return [{ offset, length, hole: false }];
    }
    const out: ReadSegment[] = [];
    let pos = offset;
    const end = offset + length;
    for (const x of extents) {
      if (pos >= end) break;
      const n = Math.min(x.length, end - pos);
      const hole = (x.flags & EXTENT_ZERO) !== 0;
      const prev = out[out.length - 1];
      if (prev !== undefined && prev.hole === hole) out[out.length - 1] = { offset: prev.offset, length: prev.length + n, hole };
      else out.push({ offset: pos, length: n, hole });
      pos += n;
    }
    if (pos < end) {
      const prev = out[out.length - 1];
      if (prev !== undefined && !prev.hole) out[out.length - 1] = { offset: prev.offset, length: prev.length + end - pos, hole: false };
      else out.push({ offset: pos, length: end - pos, hole: false });
    }
    return out;
  }

  /** NBD_CMD_BLOCK_STATUS: one chunk per meta context the client selected; `one`: REQ_ONE. */
  async blockStatus(cookie: bigint, offset: number, length: number, one: boolean): Promise<void> {
    const backend = this.backend;
    try {
      const chunks: { id: number; descriptors: BlockDescriptor[] }[] = [];
      for (const ctx of this.contexts) {
        const descriptors: BlockDescriptor[] =
          ctx.kind === 'allocation'
            ? mergeDescriptors(await backend.extents(offset, length, one ? { one: true } : undefined), one)
            : mergeDescriptors((await backend.allocationDepth(offset, length)).map((d) => ({ length: d.length, flags: d.depth })), one);
        chunks.push({ id: ctx.id, descriptors });
      }
      if (this.conn.writable()) this.conn.replies.blockStatus(cookie, chunks);
    } catch (e) {
      this.failed(cookie, NBD_CMD.BLOCK_STATUS, e);
    } finally {
      this.conn.finish(0);
    }
  }
}

/**
 * Merge neighbours with equal flags ("The server SHOULD use different status values between
 * consecutive descriptors where feasible") and bound the count; REQ_ONE keeps only the first.
 */
function mergeDescriptors(extents: readonly { length: number; flags: number }[], one: boolean): BlockDescriptor[] {
  const out: { length: number; flags: number }[] = [];
  for (const x of extents) {
    const last = out[out.length - 1];
    // Merging must not overflow the 32-bit descriptor length.
    if (last !== undefined && last.flags === x.flags && last.length + x.length <= 0xffffffff) last.length += x.length;
    else if (out.length < MAX_DESCRIPTORS) out.push({ length: x.length, flags: x.flags });
    else break;
    if (one) break;
  }
  return out;
}

