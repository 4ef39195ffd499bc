// ext2/ext3/ext4 superblock recognition, telling the three apart from the feature flags the
// way libblkid does (superblocks/ext.c): a journal and nothing ext3 lacks is ext3, neither is
// ext2, anything ext3 does not understand is ext4; an external journal device is "jbd".
//
// Superblock at byte 1024 of the volume (little-endian; offsets relative to it):
//   0x038  u16  s_magic 0xEF53
//   0x05C  u32  s_feature_compat     (0x0004 HAS_JOURNAL)
//   0x060  u32  s_feature_incompat   (0x0002 FILETYPE, 0x0004 RECOVER, 0x0008 JOURNAL_DEV, 0x0010 META_BG, ...)
//   0x064  u32  s_feature_ro_compat  (0x0001 SPARSE_SUPER, 0x0002 LARGE_FILE, 0x0004 BTREE_DIR, ...)
//   0x068  16   s_uuid
//   0x078  16   s_volume_name
//   0x160  u32  s_flags              (0x0004 TEST_FILESYS: ext4dev)

import { cString, formatUuid, optional } from './fields.js';
import type { FilesystemType, ProbeResult } from './types.js';

export const EXT_SUPERBLOCK_OFFSET = 1024;
export const EXT_SUPER_MAGIC = 0xef53;

const COMPAT_HAS_JOURNAL = 0x0004;
const INCOMPAT_FILETYPE = 0x0002;
const INCOMPAT_RECOVER = 0x0004;
const INCOMPAT_JOURNAL_DEV = 0x0008;
const INCOMPAT_META_BG = 0x0010;
const RO_COMPAT_SPARSE_SUPER = 0x0001;
const RO_COMPAT_LARGE_FILE = 0x0002;
const RO_COMPAT_BTREE_DIR = 0x0004;
const FLAGS_TEST_FILESYS = 0x0004;

const EXT2_INCOMPAT_SUPP = INCOMPAT_FILETYPE | INCOMPAT_META_BG;
const EXT3_INCOMPAT_SUPP = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG;
const EXT23_RO_COMPAT_SUPP = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR;

/** Classify an ext superblock by its features; null when no flavour accepts them (as blkid). */
export function classifyExt(compat: number, incompat: number, roCompat: number, flags: number): FilesystemType | null {
  if (incompat & INCOMPAT_JOURNAL_DEV) return 'jbd';
  const journal = (compat & COMPAT_HAS_JOURNAL) !== 0;
  const roBeyond23 = (roCompat & ~EXT23_RO_COMPAT_SUPP) !== 0;
  if (!journal && !roBeyond23 && (incompat & ~EXT2_INCOMPAT_SUPP) === 0) return 'ext2';
  const incompatBeyond3 = (incompat & ~EXT3_INCOMPAT_SUPP) !== 0;
  if (journal && !roBeyond23 && !incompatBeyond3) return 'ext3';
  if (flags & FLAGS_TEST_FILESYS) return 'ext4dev';
  if (roBeyond23 || incompatBeyond3) return 'ext4';
  return null;
}

/** `head` holds at least the first 2048 bytes of the volume. */
export function probeExt(head: Buffer): ProbeResult | null {
  const sb = EXT_SUPERBLOCK_OFFSET;
  if (head.length < sb + 1024 || head.readUInt16LE(sb + 0x38) !== EXT_SUPER_MAGIC) return null;
  const type = classifyExt(head.readUInt32LE(sb + 0x5c), head.readUInt32LE(sb + 0x60), head.readUInt32LE(sb + 0x64), head.readUInt32LE(sb + 0x160));
  if (type === null) return null;
  return { type, uuid: formatUuid(head, sb + 0x68), ...optional('label', cString(head, sb + 0x78, 16)) };
}
