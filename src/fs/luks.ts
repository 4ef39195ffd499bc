// LUKS1/LUKS2 headers (cryptsetup's on-disk format documents), recognised so that an
// encrypted volume is refused with a clear message instead of "unknown filesystem".
//
// At byte 0 (big-endian): 0x00 6 magic "LUKS\xba\xbe", 0x06 u16 version (1 or 2),
// 0xA8 40 uuid (ASCII, NUL-padded); LUKS2 also 0x18 48 label.

import { cString, optional } from './fields.js';
import type { ProbeResult } from './types.js';

const LUKS_MAGIC = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);

export function probeLuks(head: Buffer): ProbeResult | null {
  if (head.length < 512 || !head.subarray(0, 6).equals(LUKS_MAGIC)) return null;
  const version = head.readUInt16BE(6);
  if (version !== 1 && version !== 2) return null;
  return {
    type: 'crypto_LUKS',
    version: String(version),
    ...optional('uuid', cString(head, 0xa8, 40, 'latin1')),
    ...(version === 2 ? optional('label', cString(head, 0x18, 48)) : {}),
  };
}
