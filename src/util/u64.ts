// The one place where 64-bit wire and on-disk values become JavaScript numbers.
// Offsets above 2^53-1 cannot be represented exactly, so they are refused rather than rounded.

import { ImgbdError } from '../errors.js';

export const MAX_SAFE_OFFSET = Number.MAX_SAFE_INTEGER;

export class OffsetRangeError extends ImgbdError {
  constructor(what: string, value: bigint) {
    super('ERR_OFFSET_RANGE', `${what} ${value} is above 2^53-1 and cannot be handled exactly`);
  }
}

/** Read a big-endian u64 at `pos`; throws OffsetRangeError above 2^53-1. */
export function readU64(buf: Buffer, pos: number, what = 'value'): number {
  const hi = buf.readUInt32BE(pos);
  const lo = buf.readUInt32BE(pos + 4);
  if (hi > 0x1fffff) throw new OffsetRangeError(what, buf.readBigUInt64BE(pos));
  return hi * 0x1_0000_0000 + lo;
}

/** Read a big-endian u64 at `pos`, returning null (instead of throwing) above 2^53-1. */
export function readU64OrNull(buf: Buffer, pos: number): number | null {
  const hi = buf.readUInt32BE(pos);
  if (hi > 0x1fffff) return null;
  return hi * 0x1_0000_0000 + buf.readUInt32BE(pos + 4);
}

/** Write a big-endian u64 from a safe integer. */
export function writeU64(buf: Buffer, value: number, pos: number): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new ImgbdError('ERR_OFFSET_RANGE', `cannot encode ${value} as an unsigned 64-bit integer`);
  }
  buf.writeUInt32BE(Math.floor(value / 0x1_0000_0000), pos);
  buf.writeUInt32BE(value >>> 0, pos + 4);
}

/** Little-endian variants, for on-disk formats (qed, vdi). */
export function readU64LE(buf: Buffer, pos: number, what = 'value'): number {
  const lo = buf.readUInt32LE(pos);
  const hi = buf.readUInt32LE(pos + 4);
  if (hi > 0x1fffff) throw new OffsetRangeError(what, buf.readBigUInt64LE(pos));
  return hi * 0x1_0000_0000 + lo;
}

export function writeU64LE(buf: Buffer, value: number, pos: number): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new ImgbdError('ERR_OFFSET_RANGE', `cannot encode ${value} as an unsigned 64-bit integer`);
  }
  buf.writeUInt32LE(value >>> 0, pos);
  buf.writeUInt32LE(Math.floor(value / 0x1_0000_0000), pos + 4);
}
