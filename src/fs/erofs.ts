// EROFS superblock recognition (erofs_fs.h struct erofs_super_block).
//
// Superblock at byte 1024 (little-endian; offsets relative to it):
//   0x00 u32 magic 0xE0F5E1E2   0x0C u8 blkszbits (9..16)
//   0x30 16  uuid               0x40 16 volume_name

import { cString, formatUuid, isZero, optional } from './fields.js';
import type { ProbeResult } from './types.js';

export const EROFS_SUPER_OFFSET = 1024;
const EROFS_SUPER_MAGIC_V1 = 0xe0f5e1e2;

export function probeErofs(head: Buffer): ProbeResult | null {
  const sb = EROFS_SUPER_OFFSET;
  if (head.length < sb + 128 || head.readUInt32LE(sb) !== EROFS_SUPER_MAGIC_V1) return null;
  const blkszbits = head[sb + 0x0c];
  if (blkszbits < 9 || blkszbits > 16) return null;
  return {
    type: 'erofs',
    ...(isZero(head, sb + 0x30, 16) ? {} : { uuid: formatUuid(head, sb + 0x30) }),
    ...optional('label', cString(head, sb + 0x40, 16)),
  };
}
