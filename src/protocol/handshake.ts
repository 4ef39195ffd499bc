// The fixed-newstyle handshake (nbd-proto.md "Newstyle negotiation", "Option types",
// "Option reply types"): pure encoders and decoders for both sides, no I/O.
//
// Server greeting (18 bytes):       Option request (16 bytes + data):
//   0  u64 'NBDMAGIC'                 0  u64 'IHAVEOPT'
//   8  u64 'IHAVEOPT'                 8  u32 option
//  16  u16 handshake flags           12  u32 data length
//
// Option reply (20 bytes + data):    NBD_OPT_EXPORT_NAME reply:
//   0  u64 0x3e889045565a9            0  u64 export size
//   8  u32 option                     8  u16 transmission flags
//  12  u32 reply type                10  124 zero bytes unless NO_ZEROES
//  16  u32 data length

import { ImgbdError, ProtocolError } from '../errors.js';
import { readU64, writeU64 } from '../util/u64.js';
import {
  CLISERV_MAGIC,
  EXPORT_NAME_REPLY_SIZE,
  IHAVEOPT,
  NBDMAGIC,
  NBD_INFO,
  NBD_MAX_STRING,
  OPTION_HEADER_SIZE,
  OPTION_REPLY_HEADER_SIZE,
  OPTION_REPLY_MAGIC,
  SERVER_GREETING_SIZE,
} from './constants.js';

/** Option data that does not parse: the server answers NBD_REP_ERR_INVALID and carries on. */
export class OptionDataError extends ImgbdError {
  constructor(message: string) {
    super('ERR_NBD_OPTION_INVALID', message);
  }
}

// ignoreBOM: a leading U+FEFF is part of the name, not a byte-order mark to drop.
const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

function decodeString(buf: Buffer, what: string): string {
  if (buf.length > NBD_MAX_STRING) throw new OptionDataError(`${what} is ${buf.length} bytes, over the 4096-byte limit`);
  try {
    return utf8.decode(buf);
  } catch {
    throw new OptionDataError(`${what} is not valid UTF-8`);
  }
}

function encodeString(s: string, what: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.length > NBD_MAX_STRING) throw new ImgbdError('ERR_NBD_STRING_TOO_LONG', `${what} is longer than 4096 bytes`);
  return b;
}

// ---- server greeting and client flags ----

export function encodeServerGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(SERVER_GREETING_SIZE);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function decodeServerGreeting(buf: Buffer): { handshakeFlags: number } {
  if (buf.length < SERVER_GREETING_SIZE) throw new ProtocolError('ERR_NBD_SHORT', 'server greeting is truncated');
  if (buf.readBigUInt64BE(0) !== NBDMAGIC) throw new ProtocolError('ERR_NBD_BAD_MAGIC', 'not an NBD server (bad NBDMAGIC)');
  const second = buf.readBigUInt64BE(8);
  if (second === CLISERV_MAGIC) {
    throw new ProtocolError('ERR_NBD_OLDSTYLE', 'server uses the oldstyle handshake, which is not supported');
  }
  if (second !== IHAVEOPT) throw new ProtocolError('ERR_NBD_BAD_MAGIC', 'bad IHAVEOPT magic in server greeting');
  return { handshakeFlags: buf.readUInt16BE(16) };
}

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

export function decodeClientFlags(buf: Buffer): number {
  return buf.readUInt32BE(0);
}

// ---- option requests ----

export interface OptionHeader {
  readonly option: number;
  readonly length: number;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, OPTION_HEADER_SIZE);
  return b;
}

/** Decode a 16-byte option header; a wrong magic breaks the framing, so it is a ProtocolError. */
export function decodeOptionHeader(buf: Buffer): OptionHeader {
  if (buf.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolError('ERR_NBD_BAD_MAGIC', 'option request without IHAVEOPT magic');
  return { option: buf.readUInt32BE(8), length: buf.readUInt32BE(12) };
}

/** NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 count, u16 x count. */
export function encodeInfoRequest(name: string, infos: readonly number[]): Buffer {
  const n = encodeString(name, 'export name');
  const b = Buffer.allocUnsafe(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((info, i) => b.writeUInt16BE(info, 6 + n.length + 2 * i));
  return b;
}

export function decodeInfoRequest(data: Buffer): { name: string; infos: number[] } {
  // "32 bits, length of name (unsigned); MUST be no larger than the option data length - 6"
  if (data.length < 6) throw new OptionDataError('INFO/GO data shorter than 6 bytes');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 6) throw new OptionDataError('INFO/GO name length runs past the option data');
  const name = decodeString(data.subarray(4, 4 + nameLen), 'export name');
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 6 + nameLen + 2 * count) {
    throw new OptionDataError('INFO/GO information request count does not match the option length');
  }
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLen + 2 * i));
  return { name, infos };
}

/** NBD_OPT_{LIST,SET}_META_CONTEXT data: u32 name length, name, u32 count, (u32 length, query) x count. */
export function encodeMetaContextRequest(name: string, queries: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  const n = encodeString(name, 'export name');
  const head = Buffer.allocUnsafe(4);
  head.writeUInt32BE(n.length, 0);
  parts.push(head, n);
  const count = Buffer.allocUnsafe(4);
  count.writeUInt32BE(queries.length, 0);
  parts.push(count);
  for (const q of queries) {
    const qb = encodeString(q, 'metadata context query');
    const len = Buffer.allocUnsafe(4);
    len.writeUInt32BE(qb.length, 0);
    parts.push(len, qb);
  }
  return Buffer.concat(parts);
}

export function decodeMetaContextRequest(data: Buffer): { name: string; queries: string[] } {
  if (data.length < 8) throw new OptionDataError('meta context data shorter than 8 bytes');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 8) throw new OptionDataError('meta context export name length runs past the option data');
  const name = decodeString(data.subarray(4, 4 + nameLen), 'export name');
  let pos = 4 + nameLen;
  const count = data.readUInt32BE(pos);
  pos += 4;
  // Each query needs at least 4 bytes, so the count is bounded by the data actually sent.
  if (count > (data.length - pos) / 4) throw new OptionDataError('meta context query count runs past the option data');
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.length) throw new OptionDataError('meta context query length runs past the option data');
    const len = data.readUInt32BE(pos);
    pos += 4;
    if (len > data.length - pos) throw new OptionDataError('meta context query runs past the option data');
    queries.push(decodeString(data.subarray(pos, pos + len), 'metadata context query'));
    pos += len;
  }
  if (pos !== data.length) throw new OptionDataError('trailing bytes after meta context queries');
  return { name, queries };
}

// ---- option replies ----

export interface OptionReplyHeader {
  readonly option: number;
  readonly type: number;
  readonly length: number;
}

export function encodeOptionReply(option: number, type: number, data: Buffer | string = Buffer.alloc(0)): Buffer {
  const payload = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + payload.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(payload.length, 16);
  payload.copy(b, OPTION_REPLY_HEADER_SIZE);
  return b;
}

export function decodeOptionReplyHeader(buf: Buffer): OptionReplyHeader {
  if (buf.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new ProtocolError('ERR_NBD_BAD_MAGIC', 'bad option reply magic');
  return { option: buf.readUInt32BE(8), type: buf.readUInt32BE(12), length: buf.readUInt32BE(16) };
}

/** NBD_REP_SERVER data: u32 name length, name, optional description. */
export function encodeServerEntry(name: string, description = ''): Buffer {
  const n = encodeString(name, 'export name');
  const d = encodeString(description, 'export description');
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

export function decodeServerEntry(data: Buffer): { name: string; description: string } {
  if (data.length < 4) throw new ProtocolError('ERR_NBD_BAD_REPLY', 'NBD_REP_SERVER shorter than 4 bytes');
  const len = data.readUInt32BE(0);
  if (len > data.length - 4) throw new ProtocolError('ERR_NBD_BAD_REPLY', 'NBD_REP_SERVER name runs past the reply');
  return {
    name: data.subarray(4, 4 + len).toString('utf8'),
    description: data.subarray(4 + len).toString('utf8'),
  };
}

export type InfoReply =
  | { readonly type: 'export'; readonly sizeBytes: number; readonly transmissionFlags: number }
  | { readonly type: 'name'; readonly name: string }
  | { readonly type: 'description'; readonly description: string }
  | { readonly type: 'block-size'; readonly minimum: number; readonly preferred: number; readonly maximum: number }
  | { readonly type: 'unknown'; readonly info: number };

export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NBD_INFO.EXPORT, 0);
  writeU64(b, sizeBytes, 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

export function encodeInfoString(info: typeof NBD_INFO.NAME | typeof NBD_INFO.DESCRIPTION, s: string): Buffer {
  const sb = encodeString(s, info === NBD_INFO.NAME ? 'export name' : 'export description');
  const b = Buffer.allocUnsafe(2 + sb.length);
  b.writeUInt16BE(info, 0);
  sb.copy(b, 2);
  return b;
}

export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NBD_INFO.BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum >>> 0, 10);
  return b;
}

export function decodeInfoReply(data: Buffer): InfoReply {
  if (data.length < 2) throw new ProtocolError('ERR_NBD_BAD_REPLY', 'NBD_REP_INFO shorter than 2 bytes');
  const info = data.readUInt16BE(0);
  switch (info) {
    case NBD_INFO.EXPORT:
      if (data.length !== 12) throw new ProtocolError('ERR_NBD_BAD_REPLY', 'NBD_INFO_EXPORT length is not 12');
      return { type: 'export', sizeBytes: readU64(data, 2, 'export size'), transmissionFlags: data.readUInt16BE(10) };
    case NBD_INFO.NAME:
      return { type: 'name', name: data.subarray(2).toString('utf8') };
    case NBD_INFO.DESCRIPTION:
      return { type: 'description', description: data.subarray(2).toString('utf8') };
    case NBD_INFO.BLOCK_SIZE:
      if (data.length !== 14) throw new ProtocolError('ERR_NBD_BAD_REPLY', 'NBD_INFO_BLOCK_SIZE length is not 14');
      return { type: 'block-size', minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) };
    default:
      // "The client MUST ignore information replies it does not understand."
      return { type: 'unknown', info };
  }
}

/** NBD_REP_META_CONTEXT data: u32 context id, name. */
export function encodeMetaContextReply(id: number, name: string): Buffer {
  const n = encodeString(name, 'metadata context name');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id >>> 0, 0);
  n.copy(b, 4);
  return b;
}

export function decodeMetaContextReply(data: Buffer): { id: number; name: string } {
  if (data.length < 4) throw new ProtocolError('ERR_NBD_BAD_REPLY', 'NBD_REP_META_CONTEXT shorter than 4 bytes');
  return { id: data.readUInt32BE(0), name: data.subarray(4).toString('utf8') };
}

/** Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES was agreed. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : 124));
  writeU64(b, sizeBytes, 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

export function decodeExportNameReply(buf: Buffer): { sizeBytes: number; transmissionFlags: number } {
  return { sizeBytes: readU64(buf, 0, 'export size'), transmissionFlags: buf.readUInt16BE(8) };
}
