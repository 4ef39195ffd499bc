// SquashFS superblock recognition (squashfs_fs.h struct squashfs_super_block).
//
// Superblock at byte 0 (little-endian):
//   0x00 u32 s_magic "hsqs" (0x73717368)   0x1C u16 s_major   0x1E u16 s_minor
// Linux mounts major 4 only; older ones are reported as blkid's "squashfs3".

import type { ProbeResult } from './types.js';

const SQUASHFS_MAGIC = 0x73717368;

export function probeSquashfs(head: Buffer): ProbeResult | null {
  if (head.length < 96 || head.readUInt32LE(0) !== SQUASHFS_MAGIC) return null;
  const major = head.readUInt16LE(0x1c);
  const minor = head.readUInt16LE(0x1e);
  return { type: major >= 4 ? 'squashfs' : 'squashfs3', version: `${major}.${minor}` };
}
