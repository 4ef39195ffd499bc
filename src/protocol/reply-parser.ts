// The server-to-client byte stream, parsed incrementally (nbd-proto.md "Fixed newstyle
// negotiation", "Option reply types", "Simple reply message", "Structured reply chunk
// message", "Structured reply types"). Pure: bytes in, events out, no sockets.
//
// The stream is not self-describing, so the parser tracks the little context it needs:
//   - after the 18-byte greeting, option replies (20-byte header + data) follow;
//   - an NBD_OPT_EXPORT_NAME reply has no header at all, so the client announces it;
//   - an ACK to NBD_OPT_GO enters transmission, an ACK to NBD_OPT_STRUCTURED_REPLY allows
//     structured chunks, an ACK to NBD_OPT_STARTTLS ends the plaintext stream;
//   - a simple reply carries a payload only for a successful NBD_CMD_READ, whose length
//     only the client knows ("it is impossible to tell by reading the server traffic in
//     isolation whether a data field will be present"), so reads are announced by cookie.
// Every length is checked against a limit before a byte of its payload is buffered.

import type { NbdErrno } from '../errors.js';
import { ProtocolError } from '../errors.js';
import { readU64 } from '../util/u64.js';
import { ChunkQueue } from './chunk-queue.js';
import {
  EXPORT_NAME_REPLY_SIZE,
  NBD_OPT,
  NBD_REP,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  OPTION_REPLY_HEADER_SIZE,
  SERVER_GREETING_SIZE,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
  isReplyTypeError,
} from './constants.js';
import { wireToErrno } from './errno.js';
import { decodeExportNameReply, decodeOptionReplyHeader, decodeServerGreeting } from './handshake.js';
import { decodeBlockStatus, decodeErrorChunk, decodeOffsetHole, decodeReplyHeader, type BlockDescriptor } from './transmission.js';

export type StructuredChunk =
  | { readonly type: 'none' }
  | { readonly type: 'offset-data'; readonly offset: number; readonly data: Buffer }
  | { readonly type: 'offset-hole'; readonly offset: number; readonly length: number }
  | { readonly type: 'block-status'; readonly contextId: number; readonly descriptors: BlockDescriptor[] }
  | {
      readonly type: 'error';
      /** The wire reply type (ERROR, ERROR_OFFSET, or an unknown type with bit 15 set). */
      readonly replyType: number;
      /** The wire error value, and its name (unknown values read as EINVAL). */
      readonly error: number;
      readonly errno: NbdErrno;
      readonly message: string;
      readonly offset?: number;
    };

export type ReplyEvent =
  | { readonly kind: 'greeting'; readonly handshakeFlags: number }
  | { readonly kind: 'option-reply'; readonly option: number; readonly type: number; readonly data: Buffer }
  | { readonly kind: 'export-name-reply'; readonly sizeBytes: number; readonly transmissionFlags: number }
  | { readonly kind: 'simple-reply'; readonly cookie: bigint; readonly error: number; readonly data?: Buffer }
  | { readonly kind: 'chunk'; readonly cookie: bigint; readonly flags: number; readonly done: boolean; readonly chunk: StructuredChunk };

/**
 * A read the client sent. With `into`, read data is copied straight from the incoming
 * bytes into `into` (which holds export bytes [offset, offset + length)) instead of being
 * buffered first; the events then carry views of `into`.
 */
export interface ExpectedRead {
  readonly offset: number;
  readonly length: number;
  readonly into?: Buffer;
}

type Pending =
  | { readonly kind: 'option'; readonly option: number; readonly type: number; readonly length: number }
  | { readonly kind: 'simple-read'; readonly cookie: bigint; readonly length: number }
  | { readonly kind: 'chunk'; readonly cookie: bigint; readonly flags: number; readonly type: number; readonly length: number }
  /** Read data copied into the caller's buffer as it arrives: [at, at+length) of `into`. */
  | { readonly kind: 'direct'; readonly event: (data: Buffer) => ReplyEvent; readonly into: Buffer; readonly at: number; readonly length: number; copied: number }
  /** An OFFSET_DATA chunk for a read with a destination, before its 8-byte offset arrived. */
  | { readonly kind: 'direct-chunk'; readonly cookie: bigint; readonly flags: number; readonly length: number; readonly read: ExpectedRead };

export type ParserPhase = 'greeting' | 'options' | 'export-name' | 'transmission' | 'tls' | 'failed';

export interface ReplyParserOptions {
  /** Start after the greeting (a fresh parser for the stream inside TLS). */
  readonly phase?: 'greeting' | 'options';
  /** Largest option reply data accepted (replies are strings of at most 4096 bytes plus a little). */
  readonly maxOptionReplyBytes?: number;
  /** Largest structured chunk payload accepted for a cookie with no announced read. */
  readonly maxChunkPayloadBytes?: number;
}

/** Block status chunks may carry 2^20 descriptors ("SHOULD NOT send more than 2^20 extents"). */
const DEFAULT_MAX_CHUNK = 4 + 8 * (1 << 20);
const DEFAULT_MAX_OPTION_REPLY = 64 * 1024;
const OFFSET_DATA_PREFIX = 8;

function violation(message: string): ProtocolError {
  return new ProtocolError('ERR_NBD_PROTOCOL', message);
}

export class ReplyParser {
  private readonly queue = new ChunkQueue();
  private phaseNow: ParserPhase;
  private structured = false;
  private noZeroes = false;
  /** cookie -> the announced read, for reads whose reply may carry data. */
  private readonly reads = new Map<bigint, ExpectedRead>();
  private readonly maxOptionReply: number;
  private readonly maxChunk: number;
  /** A decoded header whose payload has not fully arrived yet. */
  private pending: Pending | null = null;

  constructor(opts: ReplyParserOptions = {}) {
    this.phaseNow = opts.phase ?? 'greeting';
    this.maxOptionReply = opts.maxOptionReplyBytes ?? DEFAULT_MAX_OPTION_REPLY;
    this.maxChunk = opts.maxChunkPayloadBytes ?? DEFAULT_MAX_CHUNK;
  }

  get phase(): ParserPhase {
    return this.phaseNow;
  }

  get structuredReplies(): boolean {
    return this.structured;
  }

  /** Bytes received but not yet part of a complete message. */
  get buffered(): number {
    return this.queue.length;
  }

  /** The client is about to send NBD_OPT_EXPORT_NAME: its reply has no option header. */
  expectExportNameReply(noZeroes: boolean): void {
    if (this.phaseNow !== 'options') throw violation(`EXPORT_NAME reply expected in phase ${this.phaseNow}`);
    this.phaseNow = 'export-name';
    this.noZeroes = noZeroes;
  }

  /** The client sent NBD_CMD_READ with this cookie for [offset, offset + length). */
  expectRead(cookie: bigint, read: ExpectedRead): void {
    if (read.into !== undefined && read.into.length !== read.length) throw new RangeError('the read destination must be exactly the read length');
    this.reads.set(cookie, read);
  }

  /** The client gave up on a cookie (the connection is being torn down). */
  forget(cookie: bigint): void {
    this.reads.delete(cookie);
  }

  /** Feed bytes; returns the complete messages they finish. Throws ProtocolError on a violation. */
  push(chunk: Buffer): ReplyEvent[] {
    if (this.phaseNow === 'failed') throw violation('parser already failed');
    this.queue.push(chunk);
    const events: ReplyEvent[] = [];
    try {
      for (;;) {
        const ev = this.next();
        if (ev === null) break;
        events.push(ev);
      }
    } catch (err) {
      this.phaseNow = 'failed';
      this.queue.clear();
      // Anything a decoder throws (an offset above 2^53-1, say) breaks the stream the same way.
      if (err instanceof ProtocolError) throw err;
      throw new ProtocolError('ERR_NBD_PROTOCOL', `undecodable server reply: ${(err as Error).message}`, { cause: err });
    }
    return events;
  }

  private next(): ReplyEvent | null {
    if (this.pending !== null) return this.finishPending();
    switch (this.phaseNow) {
      case 'greeting': {
        if (this.queue.length < SERVER_GREETING_SIZE) return null;
        const ev = decodeServerGreeting(this.queue.consume(SERVER_GREETING_SIZE));
        this.phaseNow = 'options';
        return { kind: 'greeting', handshakeFlags: ev.handshakeFlags };
      }
      case 'options': {
        if (this.queue.length < OPTION_REPLY_HEADER_SIZE) return null;
        const h = decodeOptionReplyHeader(this.queue.consume(OPTION_REPLY_HEADER_SIZE));
        if (h.length > this.maxOptionReply) throw violation(`option reply of ${h.length} bytes exceeds the ${this.maxOptionReply}-byte limit`);
        this.pending = { kind: 'option', option: h.option, type: h.type, length: h.length };
        return this.finishPending();
      }
      case 'export-name': {
        const size = EXPORT_NAME_REPLY_SIZE + (this.noZeroes ? 0 : 124);
        if (this.queue.length < size) return null;
        const r = decodeExportNameReply(this.queue.consume(size));
        this.phaseNow = 'transmission';
        return { kind: 'export-name-reply', sizeBytes: r.sizeBytes, transmissionFlags: r.transmissionFlags };
      }
      case 'transmission':
        return this.nextReply();
      case 'tls':
        if (this.queue.length > 0) throw violation('plaintext bytes after the STARTTLS acknowledgement');
        return null;
      case 'failed':
        return null;
    }
  }

  private nextReply(): ReplyEvent | null {
    if (this.queue.length < 4) return null;
    const magic = this.queue.peekU32(0);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      if (this.queue.length < SIMPLE_REPLY_SIZE) return null;
      const h = decodeReplyHeader(this.queue.consume(SIMPLE_REPLY_SIZE));
      if (h.kind !== 'simple') throw violation('reply header changed kind');
      const read = this.reads.get(h.cookie);
      if (read === undefined) return { kind: 'simple-reply', cookie: h.cookie, error: h.error };
      this.reads.delete(h.cookie);
      // An errored simple read reply carries no payload.
      if (h.error !== 0) return { kind: 'simple-reply', cookie: h.cookie, error: h.error };
      const cookie = h.cookie;
      this.pending =
        read.into !== undefined
          ? { kind: 'direct', event: (data) => ({ kind: 'simple-reply', cookie, error: 0, data }), into: read.into, at: 0, length: read.length, copied: 0 }
          : { kind: 'simple-read', cookie, length: read.length };
      return this.finishPending();
    }
    if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
      // "The server MUST NOT send this reply type unless the client has successfully
      // negotiated structured replies via NBD_OPT_STRUCTURED_REPLY."
      if (!this.structured) throw violation('structured reply chunk, but structured replies were not negotiated');
      if (this.queue.length < STRUCTURED_REPLY_HEADER_SIZE) return null;
      const h = decodeReplyHeader(this.queue.consume(STRUCTURED_REPLY_HEADER_SIZE));
      if (h.kind !== 'structured') throw violation('reply header changed kind');
      const read = this.reads.get(h.cookie);
      const isData = read !== undefined && h.type === NBD_REPLY_TYPE.OFFSET_DATA;
      const limit = isData ? read.length + OFFSET_DATA_PREFIX : this.maxChunk;
      if (h.length > limit) {
        throw violation(`structured chunk of ${h.length} bytes for cookie ${h.cookie} exceeds the ${limit}-byte limit`);
      }
      if (isData && read.into !== undefined) {
        if (h.length < OFFSET_DATA_PREFIX + 1) throw violation(`OFFSET_DATA chunk of ${h.length} bytes (at least 9 required)`);
        this.pending = { kind: 'direct-chunk', cookie: h.cookie, flags: h.flags, length: h.length, read };
      } else {
        this.pending = { kind: 'chunk', cookie: h.cookie, flags: h.flags, type: h.type, length: h.length };
      }
      return this.finishPending();
    }
    throw violation(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
  }

  private finishPending(): ReplyEvent | null {
    const p = this.pending!;
    if (p.kind === 'direct') return this.copyDirect(p);
    if (p.kind === 'direct-chunk') return this.startDirectChunk(p);
    if (this.queue.length < p.length) return null;
    this.pending = null;
    const data = this.queue.consume(p.length);
    switch (p.kind) {
      case 'option':
        return this.optionReply(p.option, p.type, data);
      case 'simple-read':
        return { kind: 'simple-reply', cookie: p.cookie, error: 0, data };
      case 'chunk': {
        const done = (p.flags & NBD_REPLY_FLAG_DONE) !== 0;
        if (done) this.reads.delete(p.cookie);
        return { kind: 'chunk', cookie: p.cookie, flags: p.flags, done, chunk: decodeChunk(p.type, data, done) };
      }
    }
  }

  private startDirectChunk(p: Extract<Pending, { kind: 'direct-chunk' }>): ReplyEvent | null {
    if (this.queue.length < OFFSET_DATA_PREFIX) return null;
    const offset = readU64(this.queue.consume(OFFSET_DATA_PREFIX), 0, 'data chunk offset');
    const length = p.length - OFFSET_DATA_PREFIX;
    const { read } = p;
    // Checked before a byte lands in the caller's buffer: "The data MUST lie within the
    // bounds of the original offset and length of the client's request".
    if (offset < read.offset || offset + length > read.offset + read.length) {
      throw violation(`OFFSET_DATA [${offset}, ${offset + length}) lies outside the request [${read.offset}, ${read.offset + read.length})`);
    }
    const done = (p.flags & NBD_REPLY_FLAG_DONE) !== 0;
    const { cookie, flags } = p;
    this.pending = {
      kind: 'direct',
      event: (data) => ({ kind: 'chunk', cookie, flags, done, chunk: { type: 'offset-data', offset, data } }),
      into: read.into!,
      at: offset - read.offset,
      length,
      copied: 0,
    };
    return this.copyDirect(this.pending);
  }

  private copyDirect(p: Extract<Pending, { kind: 'direct' }>): ReplyEvent | null {
    const n = Math.min(this.queue.length, p.length - p.copied);
    this.queue.copyOut(p.into, p.at + p.copied, n);
    p.copied += n;
    if (p.copied < p.length) return null;
    this.pending = null;
    const ev = p.event(p.into.subarray(p.at, p.at + p.length));
    if (ev.kind === 'chunk' && ev.done) this.reads.delete(ev.cookie);
    return ev;
  }

  private optionReply(option: number, type: number, data: Buffer): ReplyEvent {
    if (type === NBD_REP.ACK) {
      if (data.length !== 0) throw violation(`NBD_REP_ACK with ${data.length} bytes of data`);
      if (option === NBD_OPT.GO) this.phaseNow = 'transmission';
      else if (option === NBD_OPT.STRUCTURED_REPLY) this.structured = true;
      else if (option === NBD_OPT.STARTTLS) this.phaseNow = 'tls';
    }
    return { kind: 'option-reply', option, type, data };
  }
}

function decodeChunk(type: number, data: Buffer, done: boolean): StructuredChunk {
  switch (type) {
    case NBD_REPLY_TYPE.NONE:
      // "length MUST be 0 ... This chunk type MUST always be used with the NBD_REPLY_FLAG_DONE bit set"
      if (data.length !== 0) throw violation(`NBD_REPLY_TYPE_NONE with a ${data.length}-byte payload`);
      if (!done) throw violation('NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE');
      return { type: 'none' };
    case NBD_REPLY_TYPE.OFFSET_DATA:
      // "length MUST be at least 9"
      if (data.length < OFFSET_DATA_PREFIX + 1) throw violation(`OFFSET_DATA chunk of ${data.length} bytes (at least 9 required)`);
      return { type: 'offset-data', offset: readU64(data, 0, 'data chunk offset'), data: data.subarray(OFFSET_DATA_PREFIX) };
    case NBD_REPLY_TYPE.OFFSET_HOLE: {
      const h = decodeOffsetHole(data);
      if (h.length === 0) throw violation('OFFSET_HOLE with a zero hole size');
      return { type: 'offset-hole', offset: h.offset, length: h.length };
    }
    case NBD_REPLY_TYPE.BLOCK_STATUS: {
      const bs = decodeBlockStatus(data);
      return { type: 'block-status', contextId: bs.contextId, descriptors: bs.descriptors };
    }
    default: {
      if (!isReplyTypeError(type)) {
        // "If the client receives an unknown or unexpected type, other than an error chunk,
        // it MUST initiate a hard disconnect."
        throw violation(`unknown structured reply type ${type}`);
      }
      // Unknown error types share the ERROR layout; only the known ERROR_OFFSET has a tail.
      const e = decodeErrorChunk(type, data);
      if (e.error === 0) throw violation('error chunk with error value 0');
      return {
        type: 'error',
        replyType: type,
        error: e.error,
        errno: wireToErrno(e.error),
        message: e.message,
        ...(e.offset !== undefined ? { offset: e.offset } : {}),
      };
    }
  }
}
