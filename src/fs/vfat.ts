// FAT12/16/32 boot sector recognition, with the BIOS parameter block checks blkid applies
// (libblkid superblocks/vfat.c, fat_valid_superblock) so that an MBR's boot code is not taken
// for a filesystem and a FAT "superfloppy" is not taken for a partition table.
//
// Boot sector (little-endian):
//   0x00  3   jump (0xEB xx 0x90 or 0xE9 xx xx)
//   0x03  8   OEM name
//   0x0B  u16 bytes per sector (512..4096, power of two)
//   0x0D  u8  sectors per cluster (power of two)
//   0x0E  u16 reserved sectors (> 0)
//   0x10  u8  number of FATs (> 0)
//   0x11  u16 root directory entries (FAT12/16; 0 on FAT32)
//   0x13  u16 total sectors (0: use the u32 at 0x20)
//   0x15  u8  media descriptor (0xF0 or 0xF8..0xFF)
//   0x16  u16 sectors per FAT (FAT12/16; 0 on FAT32)
//   0x20  u32 total sectors
//   FAT12/16 extended BPB: 0x27 u32 volume id, 0x2B 11-byte label, 0x36 8-byte type ("FAT16   ")
//   FAT32:                 0x24 u32 sectors per FAT, 0x43 u32 volume id, 0x47 label, 0x52 type
//   0x1FE 0x55 0xAA

import type { ProbeResult } from './types.js';

const FAT12_MAX_CLUSTERS = 0xff4;
const FAT32_MAX_CLUSTERS = 0x0ffffff6;

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

export interface Bpb {
  readonly version: 'FAT12' | 'FAT16' | 'FAT32';
  readonly sectorSize: number;
  readonly clusterSectors: number;
  readonly reservedSectors: number;
  readonly fats: number;
  readonly fatSectors: number;
  readonly rootEntries: number;
  /** FAT32: first cluster of the root directory. */
  readonly rootCluster: number;
}

export function decodeBpb(bs: Buffer): Bpb | null {
  if (bs.length < 512) return null;
  const sectorSize = bs.readUInt16LE(0x0b);
  const clusterSectors = bs[0x0d];
  const reserved = bs.readUInt16LE(0x0e);
  const fats = bs[0x10];
  const dirEntries = bs.readUInt16LE(0x11);
  const media = bs[0x15];
  if (fats === 0 || reserved === 0) return null;
  if (!(media >= 0xf8 || media === 0xf0)) return null;
  if (!isPowerOfTwo(clusterSectors)) return null;
  if (!isPowerOfTwo(sectorSize) || sectorSize < 512 || sectorSize > 4096) return null;
  // OS/2 tools leave FAT-like pseudo-headers on JFS and HPFS volumes (blkid rules them out too).
  const type16 = bs.toString('latin1', 0x36, 0x3e);
  if (type16 === 'JFS     ' || type16 === 'HPFS    ') return null;
  let sectors = bs.readUInt16LE(0x13);
  if (sectors === 0) sectors = bs.readUInt32LE(0x20);
  const fat16Length = bs.readUInt16LE(0x16);
  const fatLength = fat16Length !== 0 ? fat16Length : bs.readUInt32LE(0x24);
  const dirSectors = Math.ceil((dirEntries * 32) / sectorSize);
  const dataSectors = sectors - (reserved + fatLength * fats + dirSectors);
  if (dataSectors < 0) return null;
  const clusters = Math.floor(dataSectors / clusterSectors);
  if (clusters > FAT32_MAX_CLUSTERS) return null;
  const version = fat16Length === 0 ? 'FAT32' : clusters < FAT12_MAX_CLUSTERS ? 'FAT12' : 'FAT16';
  return {
    version,
    sectorSize,
    clusterSectors,
    reservedSectors: reserved,
    fats,
    fatSectors: fatLength,
    rootEntries: dirEntries,
    rootCluster: bs.readUInt32LE(0x2c),
  };
}

function hasFatMagic(bs: Buffer): boolean {
  const jump = bs[0] === 0xeb || bs[0] === 0xe9;
  const sig = bs[0x1fe] === 0x55 && bs[0x1ff] === 0xaa;
  const t36 = bs.toString('latin1', 0x36, 0x3e);
  const t52 = bs.toString('latin1', 0x52, 0x5a);
  const typed = /^(FAT12   |FAT16   |FAT     |MSDOS)/.test(t36) || /^(FAT32   |MSWIN)/.test(t52);
  return jump || sig || typed;
}

/** True when the first sector is a valid FAT boot sector (used to tell a FAT volume from an MBR). */
export function looksLikeFatBootSector(bs: Buffer): boolean {
  return bs.length >= 512 && hasFatMagic(bs) && decodeBpb(bs) !== null;
}

export function fatLabel(raw: string): string | undefined {
  const label = raw.replace(/[ \0]+$/, '');
  return label === '' || label === 'NO NAME' ? undefined : label;
}

/**
 * Probe a FAT volume from its first sector. The label here is the boot sector's; blkid's LABEL
 * is the root directory's volume-label entry, which vfat-label.ts reads (probe.ts applies it).
 */
export function probeVfat(head: Buffer): ProbeResult | null {
  if (!looksLikeFatBootSector(head)) return null;
  const bpb = decodeBpb(head)!;
  const fat32 = bpb.version === 'FAT32';
  const idOff = fat32 ? 0x43 : 0x27;
  const labelOff = fat32 ? 0x47 : 0x2b;
  const id = head.readUInt32LE(idOff);
  const hex = id.toString(16).toUpperCase().padStart(8, '0');
  const label = fatLabel(head.toString('latin1', labelOff, labelOff + 11));
  return {
    type: 'vfat',
    version: bpb.version,
    uuid: `${hex.slice(0, 4)}-${hex.slice(4)}`,
    ...(label !== undefined ? { label } : {}),
  };
}
