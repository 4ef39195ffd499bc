// The FAT volume label as blkid reports it: the root directory entry with the VOLUME_ID
// attribute (the boot sector copy is only blkid's LABEL_FATBOOT, and tools such as Windows
// update only the directory entry). Reads are bounded: at most MAX_ROOT_DIR_BYTES of root
// directory (FAT12/16: the fixed area; FAT32: its cluster chain, at most MAX_ROOT_CLUSTERS links).
//
// Directory entry (32 bytes): 0x00 11 name, 0x0B u8 attributes (0x08 VOLUME_ID, 0x10 DIRECTORY,
// 0x0F long-name part), 0x14 u16 first cluster high, 0x1A u16 first cluster low.
// A first name byte 0x00 ends the directory, 0xE5 marks a deleted entry.

import type { BlockDevice } from '../block/device.js';
import { decodeBpb, fatLabel } from './vfat.js';

const MAX_ROOT_CLUSTERS = 100;
/** Labels are conventionally the first entry; a megabyte of directory is far past any real one. */
export const MAX_ROOT_DIR_BYTES = 1024 * 1024;
const ATTR_VOLUME_ID = 0x08;
const ATTR_DIRECTORY = 0x10;
const ATTR_LONG_NAME = 0x0f;

type Scan = { readonly label: string | undefined } | 'more';

/** Look for the volume-label entry in a run of directory entries. */
export function scanFatDirectory(dir: Buffer): Scan {
  for (let p = 0; p + 32 <= dir.length; p += 32) {
    const first = dir[p];
    if (first === 0x00) return { label: undefined };
    const attr = dir[p + 0x0b];
    if (first === 0xe5 || (attr & 0x3f) === ATTR_LONG_NAME) continue;
    if (dir.readUInt16LE(p + 0x14) !== 0 || dir.readUInt16LE(p + 0x1a) !== 0) continue;
    if ((attr & (ATTR_VOLUME_ID | ATTR_DIRECTORY)) === ATTR_VOLUME_ID) {
      const name = Buffer.from(dir.subarray(p, p + 11));
      // 0x05 stands for a leading 0xE5 character (which would otherwise mean "deleted").
      if (name[0] === 0x05) name[0] = 0xe5;
      return { label: fatLabel(name.toString('latin1')) };
    }
  }
  return 'more';
}

async function readIn(dev: BlockDevice, offset: number, length: number): Promise<Buffer | null> {
  if (offset < 0 || length <= 0 || offset + length > dev.sizeBytes) return null;
  const buf = Buffer.alloc(length);
  await dev.pread(buf, offset);
  return buf;
}

/**
 * The root directory's volume label of the FAT volume whose boot sector is `bs`: a string, or
 * undefined when there is none (or the directory lies outside the device).
 */
export async function readFatRootLabel(dev: BlockDevice, bs: Buffer): Promise<string | undefined> {
  const bpb = decodeBpb(bs);
  if (!bpb) return undefined;
  const fatsEnd = (bpb.reservedSectors + bpb.fats * bpb.fatSectors) * bpb.sectorSize;
  if (bpb.version !== 'FAT32') {
    const dir = await readIn(dev, fatsEnd, Math.min(bpb.rootEntries * 32, MAX_ROOT_DIR_BYTES));
    const r = dir ? scanFatDirectory(dir) : 'more';
    return r === 'more' ? undefined : r.label;
  }
  const clusterBytes = bpb.clusterSectors * bpb.sectorSize;
  const fatStart = bpb.reservedSectors * bpb.sectorSize;
  const seen = new Set<number>();
  let cluster = bpb.rootCluster;
  let budget = MAX_ROOT_DIR_BYTES;
  for (let i = 0; i < MAX_ROOT_CLUSTERS && budget >= clusterBytes && cluster >= 2 && cluster < 0x0ffffff7 && !seen.has(cluster); i++) {
    seen.add(cluster);
    budget -= clusterBytes;
    const dir = await readIn(dev, fatsEnd + (cluster - 2) * clusterBytes, clusterBytes);
    if (!dir) return undefined;
    const r = scanFatDirectory(dir);
    if (r !== 'more') return r.label;
    const entry = await readIn(dev, fatStart + cluster * 4, 4);
    if (!entry) return undefined;
    cluster = entry.readUInt32LE(0) & 0x0fffffff;
  }
  return undefined;
}
