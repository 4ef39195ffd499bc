// Netlink message and attribute codec (linux/netlink.h): bytes in, bytes out, no sockets.
// Netlink fields are in host byte order; every value here goes through the HOST_* helpers.
//
// struct nlmsghdr (16 bytes, host order)         struct nlattr (4 bytes, host order)
//   0  u32 nlmsg_len    header + payload, unpadded  0  u16 nla_len   header + payload, unpadded
//   4  u16 nlmsg_type                               2  u16 nla_type  bit 15 NESTED, bit 14 NET_BYTEORDER
//   6  u16 nlmsg_flags                              4  payload, then padding to 4 bytes
//   8  u32 nlmsg_seq
//  12  u32 nlmsg_pid
//  16  payload, then padding to 4 bytes (NLMSG_ALIGN)
//
// struct nlmsgerr (payload of NLMSG_ERROR)
//   0  s32 error        0 = ACK, else -errno
//   4  nlmsghdr msg     the request's header; its payload follows unless NLM_F_CAPPED
//   .. TLVs (enum nlmsgerr_attrs) when NLM_F_ACK_TLVS

import { endianness } from 'node:os';
import { ImgbdError } from '../errors.js';

export const NLMSG_HDRLEN = 16;
export const NLA_HDRLEN = 4;
export const NLMSG_ERROR_HDRLEN = 4 + NLMSG_HDRLEN;

export const NLMSG_NOOP = 0x1;
export const NLMSG_ERROR = 0x2;
export const NLMSG_DONE = 0x3;
export const NLMSG_OVERRUN = 0x4;

export const NLM_F = {
  REQUEST: 0x01,
  MULTI: 0x02,
  ACK: 0x04,
  ECHO: 0x08,
  DUMP_INTR: 0x10,
  ROOT: 0x100,
  MATCH: 0x200,
  DUMP: 0x300,
  /** On NLMSG_ERROR: the request payload was not echoed. */
  CAPPED: 0x100,
  /** On NLMSG_ERROR: extended-ack TLVs follow. */
  ACK_TLVS: 0x200,
} as const;

export const NLA_F_NESTED = 0x8000;
export const NLA_F_NET_BYTEORDER = 0x4000;
export const NLA_TYPE_MASK = 0x3fff;

export const NLMSGERR_ATTR_MSG = 1;
export const NLMSGERR_ATTR_OFFS = 2;

const HOST_LE = endianness() === 'LE';

/** A netlink message or attribute stream the kernel sent does not parse. */
export class NetlinkProtocolError extends ImgbdError {
  constructor(message: string) {
    super('ERR_NETLINK_PROTOCOL', message);
  }
}

/** NLMSG_ALIGN / NLA_ALIGN, in plain arithmetic so u32 lengths above 2^31 stay positive. */
export function nlAlign(n: number): number {
  return n + ((4 - (n % 4)) % 4);
}

// ---- attributes: encoding ----

/** An attribute to encode: raw payload bytes, or children for a nested attribute. */
export type NlAttrSpec =
  | { readonly type: number; readonly payload: Uint8Array }
  | { readonly type: number; readonly nested: readonly NlAttrSpec[] };

function u32Bytes(v: number): Buffer {
  if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new RangeError(`not a u32: ${v}`);
  const b = Buffer.alloc(4);
  if (HOST_LE) b.writeUInt32LE(v);
  else b.writeUInt32BE(v);
  return b;
}

export function nlaU8(type: number, v: number): NlAttrSpec {
  if (!Number.isInteger(v) || v < 0 || v > 0xff) throw new RangeError(`not a u8: ${v}`);
  return { type, payload: Buffer.from([v]) };
}

export function nlaU16(type: number, v: number): NlAttrSpec {
  if (!Number.isInteger(v) || v < 0 || v > 0xffff) throw new RangeError(`not a u16: ${v}`);
  const b = Buffer.alloc(2);
  if (HOST_LE) b.writeUInt16LE(v);
  else b.writeUInt16BE(v);
  return { type, payload: b };
}

export function nlaU32(type: number, v: number): NlAttrSpec {
  return { type, payload: u32Bytes(v) };
}

/** A u64 attribute; numbers must be safe integers, larger values go as bigint. */
export function nlaU64(type: number, v: number | bigint): NlAttrSpec {
  if (typeof v === 'number' && (!Number.isSafeInteger(v) || v < 0)) throw new RangeError(`not a safe u64: ${v}`);
  const big = BigInt(v);
  if (big < 0n || big > 0xffff_ffff_ffff_ffffn) throw new RangeError(`not a u64: ${v}`);
  const b = Buffer.alloc(8);
  if (HOST_LE) b.writeBigUInt64LE(big);
  else b.writeBigUInt64BE(big);
  return { type, payload: b };
}

/** A NUL-terminated string attribute (NLA_STRING / NLA_NUL_STRING both accept it). */
export function nlaString(type: number, s: string): NlAttrSpec {
  return { type, payload: Buffer.from(`${s}\0`, 'utf8') };
}

export function nlaNested(type: number, children: readonly NlAttrSpec[]): NlAttrSpec {
  return { type, nested: children };
}

function specBytes(a: NlAttrSpec): number {
  const body = 'payload' in a ? a.payload.length : a.nested.reduce((n, c) => n + nlAlign(specBytes(c)), 0);
  return NLA_HDRLEN + body;
}

function writeAttr(buf: Buffer, pos: number, a: NlAttrSpec): number {
  const len = specBytes(a);
  if (len > 0xffff) throw new RangeError(`attribute ${a.type} is ${len} bytes, above the 16-bit nla_len`);
  if (a.type < 0 || a.type > NLA_TYPE_MASK) throw new RangeError(`attribute type out of range: ${a.type}`);
  const type = 'nested' in a ? a.type | NLA_F_NESTED : a.type;
  if (HOST_LE) {
    buf.writeUInt16LE(len, pos);
    buf.writeUInt16LE(type, pos + 2);
  } else {
    buf.writeUInt16BE(len, pos);
    buf.writeUInt16BE(type, pos + 2);
  }
  let at = pos + NLA_HDRLEN;
  if ('payload' in a) {
    buf.set(a.payload, at);
  } else {
    for (const c of a.nested) at = writeAttr(buf, at, c);
  }
  return pos + nlAlign(len);
}

/** Encode attributes back to back, each padded to 4 bytes (padding is zero). */
export function encodeAttrs(attrs: readonly NlAttrSpec[]): Buffer {
  const total = attrs.reduce((n, a) => n + nlAlign(specBytes(a)), 0);
  const buf = Buffer.alloc(total);
  let pos = 0;
  for (const a of attrs) pos = writeAttr(buf, pos, a);
  return buf;
}

// ---- attributes: decoding ----

export interface NlAttr {
  /** The type without the NESTED / NET_BYTEORDER bits. */
  readonly type: number;
  readonly nested: boolean;
  readonly netByteOrder: boolean;
  /** A view into the message buffer. */
  readonly payload: Buffer;
}

/**
 * Split an attribute stream. Mirrors the kernel's nla_ok(): an attribute whose length is
 * below the header or past the end is malformed; a trailing gap below 4 bytes is padding.
 */
export function decodeAttrs(buf: Buffer): NlAttr[] {
  const out: NlAttr[] = [];
  let pos = 0;
  while (buf.length - pos >= NLA_HDRLEN) {
    const len = HOST_LE ? buf.readUInt16LE(pos) : buf.readUInt16BE(pos);
    const rawType = HOST_LE ? buf.readUInt16LE(pos + 2) : buf.readUInt16BE(pos + 2);
    if (len < NLA_HDRLEN || len > buf.length - pos) {
      throw new NetlinkProtocolError(`attribute at ${pos} has length ${len} with ${buf.length - pos} bytes left`);
    }
    out.push({
      type: rawType & NLA_TYPE_MASK,
      nested: (rawType & NLA_F_NESTED) !== 0,
      netByteOrder: (rawType & NLA_F_NET_BYTEORDER) !== 0,
      payload: buf.subarray(pos + NLA_HDRLEN, pos + len),
    });
    pos += nlAlign(len);
  }
  return out;
}

export function findAttr(attrs: readonly NlAttr[], type: number): NlAttr | undefined {
  return attrs.find((a) => a.type === type);
}

function need(a: NlAttr, bytes: number, what: string): void {
  if (a.payload.length < bytes) {
    throw new NetlinkProtocolError(`attribute ${a.type} has ${a.payload.length} bytes, ${what} needs ${bytes}`);
  }
}

export function attrU8(a: NlAttr): number {
  need(a, 1, 'u8');
  return a.payload[0]!;
}

export function attrU16(a: NlAttr): number {
  need(a, 2, 'u16');
  return HOST_LE ? a.payload.readUInt16LE(0) : a.payload.readUInt16BE(0);
}

export function attrU32(a: NlAttr): number {
  need(a, 4, 'u32');
  return HOST_LE ? a.payload.readUInt32LE(0) : a.payload.readUInt32BE(0);
}

export function attrU64(a: NlAttr): bigint {
  need(a, 8, 'u64');
  return HOST_LE ? a.payload.readBigUInt64LE(0) : a.payload.readBigUInt64BE(0);
}

/** A string attribute, up to its first NUL (the kernel pads and terminates strings). */
export function attrString(a: NlAttr): string {
  const nul = a.payload.indexOf(0);
  return a.payload.subarray(0, nul < 0 ? a.payload.length : nul).toString('utf8');
}

export function attrNested(a: NlAttr): NlAttr[] {
  return decodeAttrs(a.payload);
}

// ---- messages ----

export interface NlMsgHeader {
  readonly type: number;
  readonly flags: number;
  readonly seq: number;
  readonly pid: number;
}

export interface NlMsg extends NlMsgHeader {
  /** The payload without the alignment padding; a view into the receive buffer. */
  readonly payload: Buffer;
}

/** Encode one message: header, then the payload parts back to back (each already aligned). */
export function encodeNlMsg(h: NlMsgHeader, parts: readonly Uint8Array[]): Buffer {
  const bodyBytes = parts.reduce((n, p) => n + p.length, 0);
  const len = NLMSG_HDRLEN + bodyBytes;
  const buf = Buffer.alloc(nlAlign(len));
  const w32 = HOST_LE ? buf.writeUInt32LE.bind(buf) : buf.writeUInt32BE.bind(buf);
  const w16 = HOST_LE ? buf.writeUInt16LE.bind(buf) : buf.writeUInt16BE.bind(buf);
  w32(len, 0);
  w16(h.type, 4);
  w16(h.flags, 6);
  w32(h.seq >>> 0, 8);
  w32(h.pid >>> 0, 12);
  let pos = NLMSG_HDRLEN;
  for (const p of parts) {
    buf.set(p, pos);
    pos += p.length;
  }
  return buf;
}

function readHeader(buf: Buffer, pos: number): NlMsgHeader & { len: number } {
  return HOST_LE
    ? { len: buf.readUInt32LE(pos), type: buf.readUInt16LE(pos + 4), flags: buf.readUInt16LE(pos + 6), seq: buf.readUInt32LE(pos + 8), pid: buf.readUInt32LE(pos + 12) }
    : { len: buf.readUInt32BE(pos), type: buf.readUInt16BE(pos + 4), flags: buf.readUInt16BE(pos + 6), seq: buf.readUInt32BE(pos + 8), pid: buf.readUInt32BE(pos + 12) };
}

/** Split one datagram into messages (NLMSG_OK / NLMSG_NEXT); a bad length is an error. */
export function decodeNlMsgs(buf: Buffer): NlMsg[] {
  const out: NlMsg[] = [];
  let pos = 0;
  while (buf.length - pos >= NLMSG_HDRLEN) {
    const { len, ...h } = readHeader(buf, pos);
    if (len < NLMSG_HDRLEN || len > buf.length - pos) {
      throw new NetlinkProtocolError(`message at ${pos} has length ${len} with ${buf.length - pos} bytes left`);
    }
    out.push({ ...h, payload: buf.subarray(pos + NLMSG_HDRLEN, pos + len) });
    pos += nlAlign(len);
  }
  if (out.length === 0 && buf.length > 0) {
    throw new NetlinkProtocolError(`datagram of ${buf.length} bytes holds no complete message`);
  }
  return out;
}

export interface NlMsgErr {
  /** 0 for an ACK, else the positive errno. */
  readonly errno: number;
  /** The header of the request this answers. */
  readonly request: NlMsgHeader;
  /** NLMSGERR_ATTR_MSG, when the kernel explained itself (NETLINK_EXT_ACK). */
  readonly message?: string;
  /** NLMSGERR_ATTR_OFFS: offset of the offending attribute in the request. */
  readonly badAttrOffset?: number;
}

/** Decode the payload of an NLMSG_ERROR message; `flags` is that message's nlmsg_flags. */
export function decodeNlMsgErr(payload: Buffer, flags: number): NlMsgErr {
  if (payload.length < NLMSG_ERROR_HDRLEN) {
    throw new NetlinkProtocolError(`NLMSG_ERROR payload of ${payload.length} bytes, need ${NLMSG_ERROR_HDRLEN}`);
  }
  const error = HOST_LE ? payload.readInt32LE(0) : payload.readInt32BE(0);
  const { len: reqLen, ...request } = readHeader(payload, 4);
  let message: string | undefined;
  let badAttrOffset: number | undefined;
  if (flags & NLM_F.ACK_TLVS) {
    // The echoed request is present unless capped; the TLVs start after it.
    const echoed = flags & NLM_F.CAPPED ? NLMSG_HDRLEN : nlAlign(Math.max(reqLen, NLMSG_HDRLEN));
    const tlvStart = 4 + echoed;
    if (tlvStart <= payload.length) {
      for (const a of decodeAttrs(payload.subarray(tlvStart))) {
        if (a.type === NLMSGERR_ATTR_MSG) message = attrString(a);
        else if (a.type === NLMSGERR_ATTR_OFFS && a.payload.length >= 4) badAttrOffset = attrU32(a);
      }
    }
  }
  return { errno: error === 0 ? 0 : -error, request, ...(message !== undefined && { message }), ...(badAttrOffset !== undefined && { badAttrOffset }) };
}
