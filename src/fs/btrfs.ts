// Btrfs superblock recognition (the primary copy only, as mount uses it).
//
// Superblock at byte 65536 (little-endian; offsets relative to it):
//   0x000 32  csum               0x020 16 fsid (blkid's UUID)
//   0x030 u64 bytenr: this copy's own offset, 65536 for the primary
//   0x040 8   magic "_BHRfS_M"   0x12B 256 label

import { cString, formatUuid, optional } from './fields.js';
import type { ProbeResult } from './types.js';

export const BTRFS_SUPER_OFFSET = 65536;
export const BTRFS_SUPER_BYTES = 4096;
const BTRFS_MAGIC = Buffer.from('_BHRfS_M', 'latin1');

/** `sb` holds the bytes at BTRFS_SUPER_OFFSET (at least 0x22B of them). */
export function probeBtrfs(sb: Buffer): ProbeResult | null {
  if (sb.length < 0x12b + 256 || !sb.subarray(0x40, 0x48).equals(BTRFS_MAGIC)) return null;
  if (sb.readUInt32LE(0x30) !== BTRFS_SUPER_OFFSET || sb.readUInt32LE(0x34) !== 0) return null;
  return { type: 'btrfs', uuid: formatUuid(sb, 0x20), ...optional('label', cString(sb, 0x12b, 256)) };
}
