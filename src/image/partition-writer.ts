// Writing a partition table with one partition, for rootfs images: GPT (UEFI 2.10 section 5.3:
// protective MBR, primary header at LBA 1 and entries at LBA 2..33, backup entries and header
// at the end of the disk, CRC32 over the header and over the entry array) or a classic MBR.
// Pure: returns the byte ranges to write; 512-byte sectors.
//
// GPT header (little-endian):                     GPT entry (128 bytes, little-endian):
//   0   8  "EFI PART"                               0  16  partition type GUID
//   8   4  revision 0x00010000                     16  16  unique partition GUID
//  12   4  header size (92)                        32   8  first LBA
//  16   4  header CRC32 (computed with it zeroed)  40   8  last LBA (inclusive)
//  24   8  my LBA          32  8  alternate LBA    48   8  attributes
//  40   8  first usable    48  8  last usable      56  72  name (UTF-16LE)
//  56  16  disk GUID       72  8  entries LBA
//  80   4  entry count     84  4  entry size       88  4  entries CRC32

import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { UsageError } from '../errors.js';
import { writeU64LE } from '../util/u64.js';

export const SECTOR_BYTES = 512;
const GPT_ENTRIES = 128;
const GPT_ENTRY_BYTES = 128;
const GPT_ENTRY_SECTORS = (GPT_ENTRIES * GPT_ENTRY_BYTES) / SECTOR_BYTES;
/** Partitions start on 1 MiB boundaries, as parted and sfdisk place them. */
export const PARTITION_ALIGN_BYTES = 1024 * 1024;

export const GPT_TYPE = {
  LINUX_FILESYSTEM: '0fc63daf-8483-4772-8e79-3d69d8477de4',
  MICROSOFT_BASIC_DATA: 'ebd0a0a2-b9e5-4433-87c0-68b6b72699c7',
} as const;

export const MBR_TYPE = { LINUX: 0x83, FAT32_LBA: 0x0c } as const;

export interface PartitionPlan {
  readonly scheme: 'gpt' | 'mbr';
  readonly offsetBytes: number;
  readonly sizeBytes: number;
  /** Byte ranges of the disk to write, in any order. */
  readonly writes: readonly { readonly offset: number; readonly data: Buffer }[];
}

/** A GUID's on-disk form: the first three fields little-endian, the rest as written. */
export function encodeGuid(text: string): Buffer {
  const hex = text.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new UsageError(`invalid GUID ${text}`);
  const b = Buffer.from(hex, 'hex');
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  return b;
}

function randomGuid(): Buffer {
  const b = randomBytes(16);
  // Version 4, variant 1 (RFC 4122), in the mixed-endian disk layout.
  b[7] = (b[7]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  return b;
}

function gptHeader(myLba: number, altLba: number, firstUsable: number, lastUsable: number, diskGuid: Buffer, entriesLba: number, entriesCrc: number): Buffer {
  const h = Buffer.alloc(SECTOR_BYTES);
  h.write('EFI PART', 0, 'latin1');
  h.writeUInt32LE(0x00010000, 8);
  h.writeUInt32LE(92, 12);
  writeU64LE(h, myLba, 24);
  writeU64LE(h, altLba, 32);
  writeU64LE(h, firstUsable, 40);
  writeU64LE(h, lastUsable, 48);
  diskGuid.copy(h, 56);
  writeU64LE(h, entriesLba, 72);
  h.writeUInt32LE(GPT_ENTRIES, 80);
  h.writeUInt32LE(GPT_ENTRY_BYTES, 84);
  h.writeUInt32LE(entriesCrc, 88);
  h.writeUInt32LE(crc32(h.subarray(0, 92)), 16);
  return h;
}

function mbrEntry(mbr: Buffer, slot: number, type: number, firstLba: number, sectors: number, bootable = false): void {
  const e = 446 + slot * 16;
  mbr[e] = bootable ? 0x80 : 0;
  // CHS fields saturate (0xfe 0xff 0xff) as tools write them for LBA-addressed disks.
  mbr.set([0xfe, 0xff, 0xff], e + 1);
  mbr[e + 4] = type;
  mbr.set([0xfe, 0xff, 0xff], e + 5);
  mbr.writeUInt32LE(firstLba, e + 8);
  mbr.writeUInt32LE(sectors, e + 12);
}

/** One partition filling the disk from 1 MiB to the last aligned MiB before the GPT backup. */
export function planSinglePartition(diskBytes: number, scheme: 'gpt' | 'mbr', o: { gptType?: string; mbrType?: number; name?: string } = {}): PartitionPlan {
  if (diskBytes % SECTOR_BYTES !== 0) throw new UsageError(`the disk size ${diskBytes} is not a whole number of 512-byte sectors`);
  const sectors = diskBytes / SECTOR_BYTES;
  const firstLba = PARTITION_ALIGN_BYTES / SECTOR_BYTES;
  const reservedTail = scheme === 'gpt' ? GPT_ENTRY_SECTORS + 1 : 0;
  const endBytes = Math.floor(((sectors - reservedTail) * SECTOR_BYTES) / PARTITION_ALIGN_BYTES) * PARTITION_ALIGN_BYTES;
  if (endBytes <= PARTITION_ALIGN_BYTES) throw new UsageError(`a ${diskBytes}-byte disk leaves no room for a partition: use at least 3 MiB`);
  const lastLba = endBytes / SECTOR_BYTES - 1;
  const offsetBytes = PARTITION_ALIGN_BYTES;
  const sizeBytes = endBytes - offsetBytes;
  const mbr = Buffer.alloc(SECTOR_BYTES);
  mbr.writeUInt16LE(0xaa55, 510);
  if (scheme === 'mbr') {
    if (sectors > 0xffffffff) throw new UsageError('an MBR cannot address a disk above 2 TiB: use --partition gpt');
    mbr.writeUInt32LE(randomBytes(4).readUInt32LE(0), 440);
    mbrEntry(mbr, 0, o.mbrType ?? MBR_TYPE.LINUX, firstLba, lastLba - firstLba + 1);
    return { scheme, offsetBytes, sizeBytes, writes: [{ offset: 0, data: mbr }] };
  }
  mbrEntry(mbr, 0, 0xee, 1, Math.min(sectors - 1, 0xffffffff));
  const entries = Buffer.alloc(GPT_ENTRIES * GPT_ENTRY_BYTES);
  encodeGuid(o.gptType ?? GPT_TYPE.LINUX_FILESYSTEM).copy(entries, 0);
  randomGuid().copy(entries, 16);
  writeU64LE(entries, firstLba, 32);
  writeU64LE(entries, lastLba, 40);
  Buffer.from((o.name ?? '').slice(0, 36), 'utf16le').copy(entries, 56);
  const entriesCrc = crc32(entries);
  const diskGuid = randomGuid();
  const lastSector = sectors - 1;
  const firstUsable = 2 + GPT_ENTRY_SECTORS;
  const lastUsable = lastSector - GPT_ENTRY_SECTORS - 1;
  const backupEntriesLba = lastSector - GPT_ENTRY_SECTORS;
  return {
    scheme,
    offsetBytes,
    sizeBytes,
    writes: [
      { offset: 0, data: mbr },
      { offset: SECTOR_BYTES, data: gptHeader(1, lastSector, firstUsable, lastUsable, diskGuid, 2, entriesCrc) },
      { offset: 2 * SECTOR_BYTES, data: entries },
      { offset: backupEntriesLba * SECTOR_BYTES, data: entries },
      { offset: lastSector * SECTOR_BYTES, data: gptHeader(lastSector, 1, firstUsable, lastUsable, diskGuid, backupEntriesLba, entriesCrc) },
    ],
  };
}
