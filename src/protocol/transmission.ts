// Transmission-phase framing (nbd-proto.md "Transmission", "Structured reply chunk
// message", "Structured reply types"): pure encoders writing into caller-owned buffers,
// and decoders reading at a position. No I/O, no allocation on the encode side.
//
// Request (28 bytes):            Simple reply (16 bytes):     Structured chunk (20 bytes + payload):
//   0 u32 0x25609513               0 u32 0x67446698              0 u32 0x668e33ef
//   4 u16 command flags            4 u32 error                   4 u16 flags (DONE)
//   6 u16 type                     8 u64 cookie                  6 u16 type
//   8 u64 cookie                                                 8 u64 cookie
//  16 u64 offset                                                16 u32 payload length
//  24 u32 length

import { ProtocolError } from '../errors.js';
import { readU64, readU64OrNull, writeU64 } from '../util/u64.js';
import {
  NBD_REPLY_TYPE,
  NBD_REQUEST_MAGIC,
  NBD_EXTENDED_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  REQUEST_SIZE,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
} from './constants.js';

export interface Request {
  readonly flags: number;
  readonly type: number;
  /** Opaque to the server: echoed back unchanged. */
  readonly cookie: bigint;
  /**
   * Byte offset. Offsets above 2^53-1 decode as +Infinity: no export is that large, so
   * the request is out of range and range validation refuses it like any other.
   */
  readonly offset: number;
  readonly length: number;
}

export function decodeRequest(buf: Buffer, pos = 0): Request {
  const magic = buf.readUInt32BE(pos);
  if (magic !== NBD_REQUEST_MAGIC) {
    const what = magic === NBD_EXTENDED_REQUEST_MAGIC ? 'an extended-header request, which was not negotiated' : `bad request magic 0x${magic.toString(16)}`;
    throw new ProtocolError('ERR_NBD_BAD_MAGIC', what);
  }
  return {
    flags: buf.readUInt16BE(pos + 4),
    type: buf.readUInt16BE(pos + 6),
    cookie: buf.readBigUInt64BE(pos + 8),
    offset: readU64OrNull(buf, pos + 16) ?? Number.POSITIVE_INFINITY,
    length: buf.readUInt32BE(pos + 24),
  };
}

export function encodeRequest(buf: Buffer, pos: number, req: Request): number {
  buf.writeUInt32BE(NBD_REQUEST_MAGIC, pos);
  buf.writeUInt16BE(req.flags, pos + 4);
  buf.writeUInt16BE(req.type, pos + 6);
  buf.writeBigUInt64BE(req.cookie, pos + 8);
  writeU64(buf, req.offset, pos + 16);
  buf.writeUInt32BE(req.length >>> 0, pos + 24);
  return pos + REQUEST_SIZE;
}

export function encodeSimpleReply(buf: Buffer, pos: number, error: number, cookie: bigint): number {
  buf.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, pos);
  buf.writeUInt32BE(error >>> 0, pos + 4);
  buf.writeBigUInt64BE(cookie, pos + 8);
  return pos + SIMPLE_REPLY_SIZE;
}

export function encodeChunkHeader(buf: Buffer, pos: number, flags: number, type: number, cookie: bigint, length: number): number {
  buf.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, pos);
  buf.writeUInt16BE(flags, pos + 4);
  buf.writeUInt16BE(type, pos + 6);
  buf.writeBigUInt64BE(cookie, pos + 8);
  buf.writeUInt32BE(length >>> 0, pos + 16);
  return pos + STRUCTURED_REPLY_HEADER_SIZE;
}

export type ReplyHeader =
  | { readonly kind: 'simple'; readonly error: number; readonly cookie: bigint }
  | { readonly kind: 'structured'; readonly flags: number; readonly type: number; readonly cookie: bigint; readonly length: number };

/** Bytes needed to decode the reply header whose magic is `magic`, or 0 for an unknown magic. */
export function replyHeaderSize(magic: number): number {
  if (magic === NBD_SIMPLE_REPLY_MAGIC) return SIMPLE_REPLY_SIZE;
  if (magic === NBD_STRUCTURED_REPLY_MAGIC) return STRUCTURED_REPLY_HEADER_SIZE;
  return 0;
}

export function decodeReplyHeader(buf: Buffer, pos = 0): ReplyHeader {
  const magic = buf.readUInt32BE(pos);
  if (magic === NBD_SIMPLE_REPLY_MAGIC) {
    return { kind: 'simple', error: buf.readUInt32BE(pos + 4), cookie: buf.readBigUInt64BE(pos + 8) };
  }
  if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
    return {
      kind: 'structured',
      flags: buf.readUInt16BE(pos + 4),
      type: buf.readUInt16BE(pos + 6),
      cookie: buf.readBigUInt64BE(pos + 8),
      length: buf.readUInt32BE(pos + 16),
    };
  }
  throw new ProtocolError('ERR_NBD_BAD_MAGIC', `bad reply magic 0x${magic.toString(16)}`);
}

// ---- structured reply payloads ----

/** NBD_REPLY_TYPE_OFFSET_DATA payload prefix: u64 offset (the data follows). */
export const OFFSET_DATA_PREFIX = 8;
/** NBD_REPLY_TYPE_OFFSET_HOLE payload: u64 offset, u32 hole size. */
export const OFFSET_HOLE_SIZE = 12;

export function encodeOffsetHole(buf: Buffer, pos: number, offset: number, length: number): number {
  writeU64(buf, offset, pos);
  buf.writeUInt32BE(length >>> 0, pos + 8);
  return pos + OFFSET_HOLE_SIZE;
}

export interface BlockDescriptor {
  readonly length: number;
  readonly flags: number;
}

/** NBD_REPLY_TYPE_BLOCK_STATUS payload size for n descriptors. */
export function blockStatusPayloadSize(n: number): number {
  return 4 + 8 * n;
}

export function encodeBlockStatus(buf: Buffer, pos: number, contextId: number, descriptors: readonly BlockDescriptor[]): number {
  buf.writeUInt32BE(contextId >>> 0, pos);
  let p = pos + 4;
  for (const d of descriptors) {
    buf.writeUInt32BE(d.length >>> 0, p);
    buf.writeUInt32BE(d.flags >>> 0, p + 4);
    p += 8;
  }
  return p;
}

export function decodeBlockStatus(payload: Buffer): { contextId: number; descriptors: BlockDescriptor[] } {
  // "length MUST be 4 + (a positive integer multiple of 8)"
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) {
    throw new ProtocolError('ERR_NBD_BAD_REPLY', `block status chunk of ${payload.length} bytes is not 4 + 8n`);
  }
  const descriptors: BlockDescriptor[] = [];
  for (let p = 4; p < payload.length; p += 8) {
    const length = payload.readUInt32BE(p);
    if (length === 0) throw new ProtocolError('ERR_NBD_BAD_REPLY', 'block status descriptor with zero length');
    descriptors.push({ length, flags: payload.readUInt32BE(p + 4) });
  }
  return { contextId: payload.readUInt32BE(0), descriptors };
}

/** Size of an error chunk payload (ERROR or ERROR_OFFSET) carrying `message`. */
export function errorChunkSize(message: Buffer, withOffset: boolean): number {
  return 6 + message.length + (withOffset ? 8 : 0);
}

export function encodeErrorChunk(buf: Buffer, pos: number, error: number, message: Buffer, offset?: number): number {
  buf.writeUInt32BE(error >>> 0, pos);
  buf.writeUInt16BE(message.length, pos + 4);
  message.copy(buf, pos + 6);
  let p = pos + 6 + message.length;
  if (offset !== undefined) {
    writeU64(buf, offset, p);
    p += 8;
  }
  return p;
}

export function decodeErrorChunk(type: number, payload: Buffer): { error: number; message: string; offset?: number } {
  if (payload.length < 6) throw new ProtocolError('ERR_NBD_BAD_REPLY', 'error chunk shorter than 6 bytes');
  const error = payload.readUInt32BE(0);
  const msgLen = payload.readUInt16BE(4);
  if (msgLen > payload.length - 6) throw new ProtocolError('ERR_NBD_BAD_REPLY', 'error chunk message runs past the chunk');
  const message = payload.subarray(6, 6 + msgLen).toString('utf8');
  if (type === NBD_REPLY_TYPE.ERROR_OFFSET) {
    if (payload.length !== 14 + msgLen) throw new ProtocolError('ERR_NBD_BAD_REPLY', 'ERROR_OFFSET chunk has the wrong length');
    return { error, message, offset: readU64(payload, 6 + msgLen, 'error offset') };
  }
  return { error, message };
}

export function decodeOffsetHole(payload: Buffer): { offset: number; length: number } {
  if (payload.length !== OFFSET_HOLE_SIZE) throw new ProtocolError('ERR_NBD_BAD_REPLY', 'OFFSET_HOLE chunk is not 12 bytes');
  return { offset: readU64(payload, 0, 'hole offset'), length: payload.readUInt32BE(8) };
}
