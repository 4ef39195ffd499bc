// Transmission replies onto a socket (nbd-proto.md "Simple reply message", "Structured reply
// chunk message"). Headers are small buffers written in front of the payload, never
// concatenated with it; a read reply is one pooled buffer whose headroom holds the header.
// Pooled buffers go back to the pool from one bound write callback: a stream calls write
// callbacks in order, so a FIFO of buffers pairs each callback with its buffer without a
// closure per reply.

import { readSync } from 'node:fs';
import type { Writable } from 'node:stream';
import type { HostRun } from '../block/device.js';
import { NBD_ERRNO, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE, SIMPLE_REPLY_SIZE, STRUCTURED_REPLY_HEADER_SIZE } from '../protocol/constants.js';
import { blockStatusPayloadSize, encodeBlockStatus, encodeChunkHeader, encodeErrorChunk, encodeOffsetHole, encodeSimpleReply, errorChunkSize, OFFSET_DATA_PREFIX, OFFSET_HOLE_SIZE, type BlockDescriptor } from '../protocol/transmission.js';
import { preadNowait } from '../sys/nowait.js';
import { sendFileNow, sendNow } from '../sys/sendfile.js';
import { writeU64 } from '../util/u64.js';
import type { NbdErrno } from '../errors.js';
import { REPLY_HEADROOM, type BufferPool } from './buffer-pool.js';

const MAX_MESSAGE_BYTES = 1024;
const DATA_PREFIX = STRUCTURED_REPLY_HEADER_SIZE + OFFSET_DATA_PREFIX;

/** A segment of a sparse read: data read into the buffer, or a hole reported as zeros. */
export interface ReadSegment {
  readonly offset: number;
  readonly length: number;
  readonly hole: boolean;
}

export class ReplyWriter {
  private out: Writable;
  private readonly pool: BufferPool;
  private readonly pending: Buffer[] = [];
  private pendingHead = 0;
  private batching = false;
  private readonly alone: () => boolean;

  /** `alone`: no other reply can follow in this turn of the event loop (see batch). */
  constructor(out: Writable, pool: BufferPool, alone: () => boolean = () => false) {
    this.out = out;
    this.pool = pool;
    this.alone = alone;
  }

  /** Replies go to `out` from now on (after a STARTTLS upgrade). */
  retarget(out: Writable): void {
    if (this.batching) this.out.uncork();
    this.out = out;
  }

  private readonly onWritten = (): void => {
    const b = this.pending[this.pendingHead];
    if (b === undefined) return;
    this.pending[this.pendingHead++] = undefined as unknown as Buffer;
    if (this.pendingHead > 1024 && this.pendingHead * 2 > this.pending.length) {
      this.pending.splice(0, this.pendingHead);
      this.pendingHead = 0;
    }
    this.pool.release(b);
  };

  /**
   * Replies completed in one event-loop turn leave in one writev: the first of them corks the
   * socket and the check phase of the same turn uncorks it, so latency is unchanged. A reply
   * that cannot have company (one request at a time) leaves at once, without the detour.
   */
  private batch(): void {
    if (this.batching || this.alone()) return;
    this.batching = true;
    this.out.cork();
    setImmediate(this.endBatch);
  }

  private readonly endBatch = (): void => {
    this.batching = false;
    this.out.uncork();
  };

  private send(b: Buffer): void {
    this.batch();
    this.out.write(b);
  }

  /** Write `chunk` and give `pooled` back to the pool once it has been written. */
  private writePooled(chunk: Buffer, pooled: Buffer): void {
    this.batch();
    this.pending.push(pooled);
    this.out.write(chunk, this.onWritten);
  }

  simpleOk(cookie: bigint): void {
    const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
    encodeSimpleReply(b, 0, 0, cookie);
    this.send(b);
  }

  /**
   * A simple success reply sent to `sockFd` here and now when nothing is queued before it: for
   * a large write spliced into a file, whose reply seldom has company in its turn of the event
   * loop, so the stream's queue and the batch's deferred writev would cost more than the
   * send(2). Otherwise, or when the socket is full, as simpleOk.
   */
  simpleOkNow(cookie: bigint, sockFd: number): void {
    const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
    encodeSimpleReply(b, 0, 0, cookie);
    if (sockFd >= 0 && this.out.writableLength === 0) {
      let sent = 0;
      try {
        sent = sendNow(sockFd, b, false);
      } catch {
        // The stream meets the same error on its next write and closes the connection.
      }
      if (sent === b.length) return;
      if (sent > 0) {
        this.send(b.subarray(sent));
        return;
      }
    }
    this.send(b);
  }

  /** An error reply: a structured ERROR chunk with a message when negotiated, else a simple reply. */
  error(cookie: bigint, errno: NbdErrno, message: string, structured: boolean): void {
    const value = NBD_ERRNO[errno];
    if (!structured) {
      const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
      encodeSimpleReply(b, 0, value, cookie);
      this.send(b);
      return;
    }
    let msg = Buffer.from(message, 'utf8');
    if (msg.length > MAX_MESSAGE_BYTES) msg = msg.subarray(0, MAX_MESSAGE_BYTES);
    const len = errorChunkSize(msg, false);
    const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + len);
    encodeChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE.ERROR, cookie, len);
    encodeErrorChunk(b, STRUCTURED_REPLY_HEADER_SIZE, value, msg);
    this.send(b);
  }

  /** A final NBD_REPLY_TYPE_NONE chunk. */
  structuredDone(cookie: bigint): void {
    const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE);
    encodeChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE.NONE, cookie, 0);
    this.send(b);
  }

  /**
   * A read whose data sits at REPLY_HEADROOM in `pooled`: one buffer on the wire, as a simple
   * reply or a single OFFSET_DATA chunk marked DONE.
   */
  readData(cookie: bigint, offset: number, length: number, pooled: Buffer, structured: boolean): void {
    if (!structured) {
      const start = REPLY_HEADROOM - SIMPLE_REPLY_SIZE;
      encodeSimpleReply(pooled, start, 0, cookie);
      this.writePooled(pooled.subarray(start, REPLY_HEADROOM + length), pooled);
      return;
    }
    if (length === 0) {
      // OFFSET_DATA must describe at least one byte.
      this.pool.release(pooled);
      this.structuredDone(cookie);
      return;
    }
    const start = REPLY_HEADROOM - DATA_PREFIX;
    encodeChunkHeader(pooled, start, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE.OFFSET_DATA, cookie, OFFSET_DATA_PREFIX + length);
    writeU64(pooled, offset, start + STRUCTURED_REPLY_HEADER_SIZE);
    this.writePooled(pooled.subarray(start, REPLY_HEADROOM + length), pooled);
  }

  /**
   * A read reply whose data goes from the page cache to the socket `sockFd` with sendfile(2),
   * never copied through user space. Only called with nothing queued on the stream, so the
   * bytes reach the kernel in order. False when the socket took nothing (the caller replies
   * the ordinary way); once any byte is out the reply is completed here, what the socket did
   * not take being copied and queued behind it.
   */
  fileData(cookie: bigint, offset: number, run: HostRun, structured: boolean, sockFd: number): boolean {
    let header: Buffer;
    if (structured) {
      header = Buffer.allocUnsafe(DATA_PREFIX);
      encodeChunkHeader(header, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE.OFFSET_DATA, cookie, OFFSET_DATA_PREFIX + run.length);
      writeU64(header, offset, STRUCTURED_REPLY_HEADER_SIZE);
    } else {
      header = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
      encodeSimpleReply(header, 0, 0, cookie);
    }
    let sent: number;
    try {
      sent = sendNow(sockFd, header, true);
    } catch {
      // The stream meets the same error on its next write and closes the connection.
      return false;
    }
    if (sent === 0) return false;
    try {
      if (sent < header.length) {
        this.send(header.subarray(sent));
        this.queueFileTail(run, 0);
        return true;
      }
      const n = sendFileNow(sockFd, run.fd, run.offset, run.length);
      if (n < run.length) this.queueFileTail(run, n);
    } catch (e) {
      this.out.destroy(e as Error);
    }
    return true;
  }

  /** Bytes [from, run.length) of a file run, copied and queued on the stream. */
  private queueFileTail(run: HostRun, from: number): void {
    const len = run.length - from;
    const pooled = this.pool.acquire(len);
    const view = pooled.subarray(REPLY_HEADROOM, REPLY_HEADROOM + len);
    // The range was just found cached, so this does not wait for the disk.
    if (!preadNowait(run.fd, view, run.offset + from)) {
      for (let done = 0; done < len; ) {
        const n = readSync(run.fd, view, done, len - done, run.offset + from + done);
        if (n === 0) {
          view.fill(0, done);
          break;
        }
        done += n;
      }
    }
    this.writePooled(view, pooled);
  }

  /**
   * A sparse read as OFFSET_DATA / OFFSET_HOLE chunks in offset order, the last one DONE.
   * Data for segment s sits at REPLY_HEADROOM + (s.offset - base) in `pooled`.
   */
  readSparse(cookie: bigint, base: number, segments: readonly ReadSegment[], pooled: Buffer): void {
    const out = this.out;
    this.batch();
    const last = segments.length - 1;
    let lastData = -1;
    for (let i = 0; i <= last; i++) if (!segments[i]!.hole) lastData = i;
    if (lastData < 0) this.pool.release(pooled);
    for (let i = 0; i <= last; i++) {
      const s = segments[i]!;
      const flags = i === last ? NBD_REPLY_FLAG_DONE : 0;
      if (s.hole) {
        const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + OFFSET_HOLE_SIZE);
        encodeChunkHeader(b, 0, flags, NBD_REPLY_TYPE.OFFSET_HOLE, cookie, OFFSET_HOLE_SIZE);
        encodeOffsetHole(b, STRUCTURED_REPLY_HEADER_SIZE, s.offset, s.length);
        out.write(b);
      } else {
        const h = Buffer.allocUnsafe(DATA_PREFIX);
        encodeChunkHeader(h, 0, flags, NBD_REPLY_TYPE.OFFSET_DATA, cookie, OFFSET_DATA_PREFIX + s.length);
        writeU64(h, s.offset, STRUCTURED_REPLY_HEADER_SIZE);
        out.write(h);
        const at = REPLY_HEADROOM + (s.offset - base);
        const view = pooled.subarray(at, at + s.length);
        // The buffer goes back once the last view into it has been written.
        if (i === lastData) this.writePooled(view, pooled);
        else out.write(view);
      }
    }
  }

  /** One BLOCK_STATUS chunk per context; the last is DONE. */
  blockStatus(cookie: bigint, chunks: readonly { id: number; descriptors: readonly BlockDescriptor[] }[]): void {
    let total = 0;
    for (const c of chunks) total += STRUCTURED_REPLY_HEADER_SIZE + blockStatusPayloadSize(c.descriptors.length);
    const b = Buffer.allocUnsafe(total);
    let pos = 0;
    chunks.forEach((c, i) => {
      const flags = i === chunks.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      pos = encodeChunkHeader(b, pos, flags, NBD_REPLY_TYPE.BLOCK_STATUS, cookie, blockStatusPayloadSize(c.descriptors.length));
      pos = encodeBlockStatus(b, pos, c.id, c.descriptors);
    });
    this.send(b);
  }
}
