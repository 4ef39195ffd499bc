// XFS superblock recognition (xfs_format.h struct xfs_dsb; sanity checks after libblkid's
// xfs_verify_sb, so that a stray "XFSB" is not enough).
//
// Superblock at byte 0 (big-endian):
//   0x00 u32 sb_magicnum "XFSB"     0x04 u32 sb_blocksize     0x08 u64 sb_dblocks
//   0x20 16  sb_uuid                0x58 u32 sb_agcount
//   0x66 u16 sb_sectsize            0x68 u16 sb_inodesize     0x6C 12  sb_fname (label)
//   0x78 u8  sb_blocklog            0x79 u8  sb_sectlog       0x7A u8  sb_inodelog
//   0x7B u8  sb_inopblog            0x7F u8  sb_imax_pct

import { cString, formatUuid, optional } from './fields.js';
import type { ProbeResult } from './types.js';

const XFS_MAGIC = 0x58465342;

export function probeXfs(head: Buffer): ProbeResult | null {
  if (head.length < 512 || head.readUInt32BE(0) !== XFS_MAGIC) return null;
  const blocksize = head.readUInt32BE(0x04);
  const agcount = head.readUInt32BE(0x58);
  const sectsize = head.readUInt16BE(0x66);
  const inodesize = head.readUInt16BE(0x68);
  const blocklog = head[0x78];
  const sectlog = head[0x79];
  const inodelog = head[0x7a];
  const inopblog = head[0x7b];
  const imaxPct = head[0x7f];
  const dblocksZero = head.readUInt32BE(0x08) === 0 && head.readUInt32BE(0x0c) === 0;
  const ok =
    agcount > 0 &&
    sectlog >= 9 && sectlog <= 15 && sectsize === 1 << sectlog &&
    blocklog >= 9 && blocklog <= 16 && blocksize === 2 ** blocklog &&
    inodelog >= 8 && inodelog <= 11 && inodesize === 1 << inodelog &&
    blocklog - inodelog === inopblog &&
    imaxPct <= 100 &&
    !dblocksZero;
  if (!ok) return null;
  return { type: 'xfs', uuid: formatUuid(head, 0x20), ...optional('label', cString(head, 0x6c, 12)) };
}
