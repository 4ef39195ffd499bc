// The VDI header (vdi-notes.md, sections 3 and 5): decoding with the checks QEMU's block/vdi.c
// makes on open, plus the ones it leaves out that keep a hostile header from steering reads
// outside the file or into a huge allocation (header size, map and data areas inside the file
// and not overlapping). Encoding for create and for blocks_allocated updates.
//
//   offset size field (all little-endian)
//   0x000  64   text              free-form banner
//   0x040  4    signature         0xbeda107f
//   0x044  4    version           0x00010001 (1.1)
//   0x048  4    header_size       bytes from this field; QEMU writes 0x180
//   0x04c  4    image_type        1 dynamic, 2 static
//   0x050  4    image_flags
//   0x054  256  description
//   0x154  4    offset_bmap       bytes, multiple of 512
//   0x158  4    offset_data       bytes, multiple of 512
//   0x15c  12   cylinders, heads, sectors (unused)
//   0x168  4    sector_size       512
//   0x16c  4    unused1
//   0x170  8    disk_size         bytes
//   0x178  4    block_size        1 MiB
//   0x17c  4    block_extra       ignored
//   0x180  4    blocks_in_image   block-map entries
//   0x184  4    blocks_allocated  data blocks present; the next one goes at this index
//   0x188  16   uuid_image        mixed-endian (see vdi/uuid.ts)
//   0x198  16   uuid_last_snap
//   0x1a8  16   uuid_link         must be zero
//   0x1b8  16   uuid_parent       must be zero (no differencing images)
//   0x1c8  56   unused2
//   0x200        (end)

import { CorruptImageError, UnsupportedImageError } from '../../errors.js';
import { OffsetRangeError, readU64LE, writeU64LE } from '../../util/u64.js';

export const VDI_HEADER_BYTES = 512;
export const VDI_SIGNATURE = 0xbeda107f;
export const VDI_VERSION_1_1 = 0x00010001;
export const VDI_HEADER_SIZE_FIELD = 0x180;
export const VDI_TYPE = { DYNAMIC: 1, STATIC: 2 } as const;
export const VDI_BLOCK_SIZE = 1024 * 1024;
export const VDI_SECTOR_SIZE = 512;
export const VDI_UNALLOCATED = 0xffffffff;
export const VDI_DISCARDED = 0xfffffffe;
/** (INT_MAX + 1 - 512) / 4: the whole map, rounded to sectors, fits in an int. */
export const VDI_BLOCKS_IN_IMAGE_MAX = 0x1fffff80;
export const VDI_DISK_SIZE_MAX = VDI_BLOCKS_IN_IMAGE_MAX * VDI_BLOCK_SIZE;
export const VDI_TEXT = '<<< QEMU VM Virtual Disk Image >>>\n';

const OFF = {
  signature: 0x40,
  version: 0x44,
  headerSize: 0x48,
  imageType: 0x4c,
  imageFlags: 0x50,
  offsetBmap: 0x154,
  offsetData: 0x158,
  sectorSize: 0x168,
  diskSize: 0x170,
  blockSize: 0x178,
  blockExtra: 0x17c,
  blocksInImage: 0x180,
  blocksAllocated: 0x184,
  uuidImage: 0x188,
  uuidLastSnap: 0x198,
  uuidLink: 0x1a8,
  uuidParent: 0x1b8,
} as const;

export interface VdiHeader {
  readonly imageType: number;
  readonly offsetBmap: number;
  readonly offsetData: number;
  readonly diskSize: number;
  readonly blockSize: number;
  readonly blocksInImage: number;
  readonly blocksAllocated: number;
  /** On-disk (mixed-endian) bytes. */
  readonly uuidImage: Buffer;
  readonly uuidLastSnap: Buffer;
}

/** Bytes the block map occupies on disk: entries rounded up to whole sectors, as QEMU reads it. */
export function vdiMapBytes(blocksInImage: number): number {
  return Math.ceil((blocksInImage * 4) / VDI_SECTOR_SIZE) * VDI_SECTOR_SIZE;
}

function isZero(b: Buffer): boolean {
  for (const x of b) if (x !== 0) return false;
  return true;
}

/** Decode and validate; `fileSize` bounds the map and the data area before anything is allocated. */
export function parseVdiHeader(buf: Buffer, fileSize: number): VdiHeader {
  if (buf.length < VDI_HEADER_BYTES || fileSize < VDI_HEADER_BYTES) throw new CorruptImageError(`vdi: file is ${fileSize} bytes, too short for the ${VDI_HEADER_BYTES}-byte header`);
  if (buf.readUInt32LE(OFF.signature) !== VDI_SIGNATURE) throw new CorruptImageError('vdi: bad signature (not a VDI image)');
  const version = buf.readUInt32LE(OFF.version);
  if (version !== VDI_VERSION_1_1) throw new UnsupportedImageError(`vdi: version ${version >>> 16}.${version & 0xffff} is not supported (only 1.1)`);
  const headerSize = buf.readUInt32LE(OFF.headerSize);
  // VirtualBox writes 0x180 (VDIHEADER1) or 0x190 (with LCHS geometry); both end inside 512 bytes.
  if (headerSize < VDI_HEADER_SIZE_FIELD || OFF.headerSize + headerSize > VDI_HEADER_BYTES) {
    throw new CorruptImageError(`vdi: header size ${headerSize} is outside [${VDI_HEADER_SIZE_FIELD}, ${VDI_HEADER_BYTES - OFF.headerSize}]`);
  }
  const imageType = buf.readUInt32LE(OFF.imageType);
  if (imageType !== VDI_TYPE.DYNAMIC && imageType !== VDI_TYPE.STATIC) throw new UnsupportedImageError(`vdi: image type ${imageType} is neither dynamic (1) nor static (2)`);
  const offsetBmap = buf.readUInt32LE(OFF.offsetBmap);
  const offsetData = buf.readUInt32LE(OFF.offsetData);
  if (offsetBmap % VDI_SECTOR_SIZE !== 0) throw new UnsupportedImageError(`vdi: unaligned block map offset ${offsetBmap}`);
  if (offsetData % VDI_SECTOR_SIZE !== 0) throw new UnsupportedImageError(`vdi: unaligned data offset ${offsetData}`);
  const sectorSize = buf.readUInt32LE(OFF.sectorSize);
  if (sectorSize !== VDI_SECTOR_SIZE) throw new UnsupportedImageError(`vdi: sector size ${sectorSize} is not 512`);
  let diskSize: number;
  try {
    diskSize = readU64LE(buf, OFF.diskSize, 'disk size');
  } catch (e) {
    if (e instanceof OffsetRangeError) throw new CorruptImageError(`vdi: disk size ${buf.readBigUInt64LE(OFF.diskSize)} is out of range`, { cause: e });
    throw e;
  }
  const blockSize = buf.readUInt32LE(OFF.blockSize);
  if (blockSize !== VDI_BLOCK_SIZE) throw new UnsupportedImageError(`vdi: block size ${blockSize} is not 1 MiB`);
  const blocksInImage = buf.readUInt32LE(OFF.blocksInImage);
  const blocksAllocated = buf.readUInt32LE(OFF.blocksAllocated);
  if (diskSize > VDI_DISK_SIZE_MAX) throw new UnsupportedImageError(`vdi: disk size ${diskSize} exceeds the maximum ${VDI_DISK_SIZE_MAX}`);
  if (blocksInImage > VDI_BLOCKS_IN_IMAGE_MAX) throw new CorruptImageError(`vdi: block count ${blocksInImage} exceeds the maximum ${VDI_BLOCKS_IN_IMAGE_MAX}`);
  // "disk_size must not be larger than blocks_in_image * block_size (the map must cover the whole disk)."
  if (diskSize > blocksInImage * blockSize) throw new CorruptImageError(`vdi: disk size ${diskSize} is larger than ${blocksInImage} blocks of ${blockSize} bytes`);
  // More blocks than the disk needs would let the map, and the allocation it costs, grow without bound.
  const needed = Math.ceil(diskSize / blockSize);
  if (blocksInImage > needed) throw new CorruptImageError(`vdi: block count ${blocksInImage} does not match the disk size ${diskSize} (${needed} blocks)`);
  if (blocksAllocated > blocksInImage) throw new CorruptImageError(`vdi: ${blocksAllocated} blocks allocated out of ${blocksInImage}`);
  const mapBytes = vdiMapBytes(blocksInImage);
  if (offsetBmap < VDI_HEADER_BYTES) throw new CorruptImageError(`vdi: block map offset ${offsetBmap} overlaps the header`);
  if (offsetBmap + blocksInImage * 4 > fileSize) throw new CorruptImageError(`vdi: block map at ${offsetBmap} (${blocksInImage} entries) is past the end of the ${fileSize}-byte file`);
  if (offsetData < offsetBmap + blocksInImage * 4) throw new CorruptImageError(`vdi: data offset ${offsetData} overlaps the block map at [${offsetBmap}, +${mapBytes})`);
  if (!isZero(buf.subarray(OFF.uuidLink, OFF.uuidLink + 16))) throw new UnsupportedImageError('vdi: non-NULL link UUID (differencing images are not supported)');
  if (!isZero(buf.subarray(OFF.uuidParent, OFF.uuidParent + 16))) throw new UnsupportedImageError('vdi: non-NULL parent UUID (differencing images are not supported)');
  return {
    imageType,
    offsetBmap,
    offsetData,
    diskSize,
    blockSize,
    blocksInImage,
    blocksAllocated,
    uuidImage: Buffer.from(buf.subarray(OFF.uuidImage, OFF.uuidImage + 16)),
    uuidLastSnap: Buffer.from(buf.subarray(OFF.uuidLastSnap, OFF.uuidLastSnap + 16)),
  };
}

/** The 512-byte header QEMU writes for `h` (banner, fixed fields, everything else zero). */
export function encodeVdiHeader(h: VdiHeader): Buffer {
  const b = Buffer.alloc(VDI_HEADER_BYTES);
  b.write(VDI_TEXT, 0, 'latin1');
  b.writeUInt32LE(VDI_SIGNATURE, OFF.signature);
  b.writeUInt32LE(VDI_VERSION_1_1, OFF.version);
  b.writeUInt32LE(VDI_HEADER_SIZE_FIELD, OFF.headerSize);
  b.writeUInt32LE(h.imageType, OFF.imageType);
  b.writeUInt32LE(h.offsetBmap, OFF.offsetBmap);
  b.writeUInt32LE(h.offsetData, OFF.offsetData);
  b.writeUInt32LE(VDI_SECTOR_SIZE, OFF.sectorSize);
  writeU64LE(b, h.diskSize, OFF.diskSize);
  b.writeUInt32LE(h.blockSize, OFF.blockSize);
  b.writeUInt32LE(h.blocksInImage, OFF.blocksInImage);
  b.writeUInt32LE(h.blocksAllocated, OFF.blocksAllocated);
  h.uuidImage.copy(b, OFF.uuidImage);
  h.uuidLastSnap.copy(b, OFF.uuidLastSnap);
  return b;
}

/** Offset of blocks_allocated, for in-place updates of that one field. */
export const VDI_BLOCKS_ALLOCATED_OFFSET = OFF.blocksAllocated;
