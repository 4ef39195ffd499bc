// The QED header (qed_spec.rst, "Header"): decoding with every field validated before use,
// and encoding for create and for feature-bit updates.
//
//   offset size  field (all little-endian)
//   0      4     magic                    "QED\0"
//   4      4     cluster_size             bytes, power of two in [2^12, 2^26]
//   8      4     table_size               clusters per L1/L2 table, power of two in [1, 16]
//   12     4     header_size              clusters before the first regular cluster
//   16     8     features                 QED_F_*; unknown bits: must not open
//   24     8     compat_features          unknown bits: ignored
//   32     8     autoclear_features       unknown bits: cleared on a writable open
//   40     8     l1_table_offset          bytes, cluster aligned
//   48     8     image_size               bytes, multiple of 512
//   56     4     backing_filename_offset  bytes from the start of the header
//   60     4     backing_filename_size    bytes, not NUL-terminated
//   64           (end of the fixed header)

import { CorruptImageError, UnsupportedImageError } from '../../errors.js';
import { OffsetRangeError, readU64LE, writeU64LE } from '../../util/u64.js';

export const QED_MAGIC = 0x00444551; // "QED\0" read as little-endian u32
export const QED_HEADER_BYTES = 64;

export const QED_F = {
  BACKING_FILE: 0x01,
  NEED_CHECK: 0x02,
  BACKING_FORMAT_NO_PROBE: 0x04,
} as const;
export const QED_FEATURE_MASK = QED_F.BACKING_FILE | QED_F.NEED_CHECK | QED_F.BACKING_FORMAT_NO_PROBE;

export const QED_MIN_CLUSTER_SIZE = 1 << 12;
export const QED_MAX_CLUSTER_SIZE = 1 << 26;
export const QED_MIN_TABLE_SIZE = 1;
export const QED_MAX_TABLE_SIZE = 16;
export const QED_DEFAULT_CLUSTER_SIZE = 64 * 1024;
export const QED_DEFAULT_TABLE_SIZE = 4;
/**
 * Largest table this driver loads. The format allows 16 x 64 MiB = 1 GiB tables, which would let a
 * hostile header make every table read a gigabyte allocation; QEMU's defaults give 256 KiB.
 */
export const QED_MAX_TABLE_BYTES = 32 * 1024 * 1024;
/** Backing file names longer than this are refused (PATH_MAX). */
export const QED_MAX_BACKING_NAME_BYTES = 4096;

/** Data cluster offset 1: "The data cluster contents are all zeroes and no cluster is allocated." */
export const QED_ZERO_CLUSTER = 1;

export interface QedHeader {
  readonly clusterSize: number;
  readonly tableSize: number;
  readonly headerSize: number;
  readonly features: number;
  readonly compatFeatures: bigint;
  readonly autoclearFeatures: bigint;
  readonly l1TableOffset: number;
  readonly imageSize: number;
  readonly backingFilenameOffset: number;
  readonly backingFilenameSize: number;
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** Entries per table: TABLE_NOFFSETS = table_size * cluster_size / sizeof(uint64_t). */
export function qedTableEntries(clusterSize: number, tableSize: number): number {
  return (tableSize * clusterSize) / 8;
}

/** "header.image_size <= TABLE_NOFFSETS * TABLE_NOFFSETS * header.cluster_size" */
export function qedMaxImageSize(clusterSize: number, tableSize: number): number {
  const n = qedTableEntries(clusterSize, tableSize);
  return Math.min(n * n * clusterSize, Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % 512));
}

export function isValidImageSize(imageSize: number, clusterSize: number, tableSize: number): boolean {
  return Number.isSafeInteger(imageSize) && imageSize >= 0 && imageSize % 512 === 0 && imageSize <= qedMaxImageSize(clusterSize, tableSize);
}

function u64(buf: Buffer, pos: number, what: string): number {
  try {
    return readU64LE(buf, pos, what);
  } catch (e) {
    if (e instanceof OffsetRangeError) throw new CorruptImageError(`qed: ${what} ${buf.readBigUInt64LE(pos)} is out of range`, { cause: e });
    throw e;
  }
}

/**
 * Decode and validate the header. `fileSize` bounds every offset: the header, the L1 table and the
 * backing file name must all lie inside the file.
 */
export function parseQedHeader(buf: Buffer, fileSize: number): QedHeader {
  if (buf.length < QED_HEADER_BYTES || fileSize < QED_HEADER_BYTES) throw new CorruptImageError(`qed: file is ${fileSize} bytes, too short for the ${QED_HEADER_BYTES}-byte header`);
  if (buf.readUInt32LE(0) !== QED_MAGIC) throw new CorruptImageError('qed: bad magic (not a QED image)');
  const clusterSize = buf.readUInt32LE(4);
  const tableSize = buf.readUInt32LE(8);
  const headerSize = buf.readUInt32LE(12);
  const featuresBig = buf.readBigUInt64LE(16);
  const compatFeatures = buf.readBigUInt64LE(24);
  const autoclearFeatures = buf.readBigUInt64LE(32);

  // "An image with unknown features bits enabled must not be opened."
  const unknown = featuresBig & ~BigInt(QED_FEATURE_MASK);
  if (unknown !== 0n) throw new UnsupportedImageError(`qed: unknown feature bits 0x${unknown.toString(16)}`);
  const features = Number(featuresBig);

  // "cluster_size must be a power of 2 in range [2^12, 2^26]."
  if (!isPowerOfTwo(clusterSize) || clusterSize < QED_MIN_CLUSTER_SIZE || clusterSize > QED_MAX_CLUSTER_SIZE) {
    throw new CorruptImageError(`qed: cluster size ${clusterSize} is not a power of two in [4096, 64M]`);
  }
  // "table_size must be a power of 2 in range [1, 16]."
  if (!isPowerOfTwo(tableSize) || tableSize < QED_MIN_TABLE_SIZE || tableSize > QED_MAX_TABLE_SIZE) {
    throw new CorruptImageError(`qed: table size ${tableSize} is not a power of two in [1, 16]`);
  }
  const tableBytes = tableSize * clusterSize;
  if (tableBytes > QED_MAX_TABLE_BYTES) throw new UnsupportedImageError(`qed: tables of ${tableBytes} bytes exceed this driver's ${QED_MAX_TABLE_BYTES}-byte limit`);
  if (headerSize < 1) throw new CorruptImageError('qed: header size is 0 clusters');
  const headerBytes = headerSize * clusterSize;
  if (headerBytes > fileSize) throw new CorruptImageError(`qed: header size ${headerSize} clusters (${headerBytes} bytes) is past the end of the ${fileSize}-byte file`);

  const l1TableOffset = u64(buf, 40, 'L1 table offset');
  const imageSize = u64(buf, 48, 'image size');
  // "l1_table_offset ... must be a multiple of cluster_size."
  if (l1TableOffset % clusterSize !== 0) throw new CorruptImageError(`qed: L1 table offset ${l1TableOffset} is not cluster aligned`);
  if (l1TableOffset < headerBytes) throw new CorruptImageError(`qed: L1 table offset ${l1TableOffset} overlaps the ${headerBytes}-byte header`);
  if (l1TableOffset + tableBytes > fileSize) throw new CorruptImageError(`qed: L1 table at ${l1TableOffset} (${tableBytes} bytes) is past the end of the ${fileSize}-byte file`);
  // "image_size ... must be a multiple of 512 bytes" and fit under the L1 table.
  if (imageSize % 512 !== 0) throw new CorruptImageError(`qed: image size ${imageSize} is not a multiple of 512`);
  if (imageSize > qedMaxImageSize(clusterSize, tableSize)) throw new CorruptImageError(`qed: image size ${imageSize} exceeds what the L1 table can map`);

  const backingFilenameOffset = buf.readUInt32LE(56);
  const backingFilenameSize = buf.readUInt32LE(60);
  if (features & QED_F.BACKING_FILE) {
    // "The string must be stored within the first header_size clusters."
    if (backingFilenameOffset + backingFilenameSize > headerBytes) {
      throw new CorruptImageError(`qed: backing file name [${backingFilenameOffset}, +${backingFilenameSize}) is past the ${headerBytes}-byte header area`);
    }
    if (backingFilenameSize === 0) throw new CorruptImageError('qed: backing file feature set with an empty name');
    if (backingFilenameSize > QED_MAX_BACKING_NAME_BYTES) throw new UnsupportedImageError(`qed: backing file name of ${backingFilenameSize} bytes is too long`);
  }
  return { clusterSize, tableSize, headerSize, features, compatFeatures, autoclearFeatures, l1TableOffset, imageSize, backingFilenameOffset, backingFilenameSize };
}

/** The 64-byte header for `h`. */
export function encodeQedHeader(h: QedHeader): Buffer {
  const b = Buffer.alloc(QED_HEADER_BYTES);
  b.writeUInt32LE(QED_MAGIC, 0);
  b.writeUInt32LE(h.clusterSize, 4);
  b.writeUInt32LE(h.tableSize, 8);
  b.writeUInt32LE(h.headerSize, 12);
  b.writeBigUInt64LE(BigInt(h.features), 16);
  b.writeBigUInt64LE(h.compatFeatures, 24);
  b.writeBigUInt64LE(h.autoclearFeatures, 32);
  writeU64LE(b, h.l1TableOffset, 40);
  writeU64LE(b, h.imageSize, 48);
  b.writeUInt32LE(h.backingFilenameOffset, 56);
  b.writeUInt32LE(h.backingFilenameSize, 60);
  return b;
}
