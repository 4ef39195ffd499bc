// The qcow2 image header and its extensions (qcow2.txt, "Header", "Header extensions",
// "Feature name table"): decoding with every field validated before use, and encoding for
// image creation and in-place feature updates.
//
//  off  size  field (all big-endian)
//    0     4  magic "QFI\xfb"
//    4     4  version (2 or 3)
//    8     8  backing_file_offset (bytes, 0 = none; the name lives in cluster 0)
//   16     4  backing_file_size (bytes, <= 1023)
//   20     4  cluster_bits (9..21)
//   24     8  size (virtual disk bytes)
//   32     4  crypt_method (0 none, 1 AES, 2 LUKS)
//   36     4  l1_size (entries)
//   40     8  l1_table_offset (bytes, cluster aligned)
//   48     8  refcount_table_offset (bytes, cluster aligned)
//   56     4  refcount_table_clusters
//   60     4  nb_snapshots
//   64     8  snapshots_offset (bytes, cluster aligned)
//   ---- version 3 only ----
//   72     8  incompatible_features
//   80     8  compatible_features
//   88     8  autoclear_features
//   96     4  refcount_order (0..6; v2 implies 4)
//  100     4  header_length (bytes, >= 104, multiple of 8)
//  104     1  compression_type (0 zlib, 1 zstd; present when header_length > 104)
//  header_length: extensions { u32 type, u32 length, data, pad to 8 }*, ended by type 0

import { CorruptImageError, UnsupportedImageError } from '../../errors.js';
import { readU64OrNull, writeU64 } from '../../util/u64.js';

export const QCOW2_MAGIC = 0x514649fb;
export const QCOW2_V2_HEADER_BYTES = 72;
export const QCOW2_V3_HEADER_BYTES = 104;
export const QCOW2_MIN_CLUSTER_BITS = 9;
export const QCOW2_MAX_CLUSTER_BITS = 21;
/** QEMU's implementation limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE); larger tables are refused before allocating. */
export const QCOW2_MAX_L1_BYTES = 32 * 1024 * 1024;
export const QCOW2_MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const QCOW2_MAX_SNAPSHOTS = 65536;
export const QCOW2_MAX_BACKING_NAME_BYTES = 1023;

export const QCOW2_INCOMPAT = {
  DIRTY: 1n << 0n,
  CORRUPT: 1n << 1n,
  DATA_FILE: 1n << 2n,
  COMPRESSION: 1n << 3n,
  EXTL2: 1n << 4n,
} as const;
export const QCOW2_INCOMPAT_KNOWN = 0x1fn;
export const QCOW2_COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const QCOW2_AUTOCLEAR = {
  BITMAPS: 1n << 0n,
  DATA_FILE_RAW: 1n << 1n,
} as const;

export const QCOW2_EXT = {
  END: 0x00000000,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_TABLE: 0x6803f857,
  BITMAPS: 0x23852875,
  CRYPTO: 0x0537be77,
  DATA_FILE: 0x44415441,
} as const;

export const QCOW2_COMPRESSION = { ZLIB: 0, ZSTD: 1 } as const;
export type Qcow2CompressionType = (typeof QCOW2_COMPRESSION)[keyof typeof QCOW2_COMPRESSION];

/** Byte offsets of header fields updated in place. */
export const QCOW2_HDR = {
  REFCOUNT_TABLE_OFFSET: 48,
  INCOMPATIBLE: 72,
  AUTOCLEAR: 88,
  L1_SIZE: 36,
  L1_TABLE_OFFSET: 40,
  NB_SNAPSHOTS: 60,
} as const;

export interface Qcow2FeatureName {
  readonly type: 0 | 1 | 2;
  readonly bit: number;
  readonly name: string;
}

export interface Qcow2Extension {
  readonly type: number;
  /** Offset of the extension's data in the image file. */
  readonly dataOffset: number;
  readonly data: Buffer;
}

export interface Qcow2Header {
  readonly version: 2 | 3;
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly sizeBytes: number;
  readonly cryptMethod: number;
  readonly l1Size: number;
  readonly l1TableOffset: number;
  readonly refcountTableOffset: number;
  readonly refcountTableClusters: number;
  readonly nbSnapshots: number;
  readonly snapshotsOffset: number;
  readonly incompatibleFeatures: bigint;
  readonly compatibleFeatures: bigint;
  readonly autoclearFeatures: bigint;
  readonly refcountOrder: number;
  readonly headerLength: number;
  readonly compressionType: Qcow2CompressionType;
  readonly backingFileOffset: number;
  readonly backingFile: string | null;
  readonly backingFormat: string | null;
  readonly dataFile: string | null;
  readonly featureNames: readonly Qcow2FeatureName[];
  /** Raw bitmaps extension data; preserved untouched, never interpreted beyond its presence. */
  readonly bitmapsExtension: Buffer | null;
  /** Every extension in file order, including unknown ones. */
  readonly extensions: readonly Qcow2Extension[];
}

/** Bits used by an L2 (standard or extended) table: entries per table = cluster/entry size. */
export function l2EntryBytes(h: Pick<Qcow2Header, 'incompatibleFeatures'>): number {
  return (h.incompatibleFeatures & QCOW2_INCOMPAT.EXTL2) !== 0n ? 16 : 8;
}

/** Minimum L1 entries needed to map `sizeBytes`. */
export function l1EntriesFor(sizeBytes: number, clusterBits: number, l2EntrySize: number): number {
  const bytesPerL1 = (2 ** clusterBits / l2EntrySize) * 2 ** clusterBits;
  return Math.ceil(sizeBytes / bytesPerL1);
}

function u64Field(buf: Buffer, pos: number, what: string): number {
  const v = readU64OrNull(buf, pos);
  if (v === null) throw new CorruptImageError(`qcow2 header: ${what} ${buf.readBigUInt64BE(pos)} is out of range`);
  return v;
}

function describeBits(mask: bigint, type: 0 | 1 | 2, names: readonly Qcow2FeatureName[]): string {
  const out: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if ((mask & (1n << BigInt(bit))) === 0n) continue;
    const n = names.find((f) => f.type === type && f.bit === bit);
    out.push(n ? `bit ${bit} (${n.name})` : `bit ${bit}`);
  }
  return out.join(', ');
}

interface Range {
  readonly what: string;
  readonly start: number;
  readonly end: number;
}

function checkTableRange(r: Range, clusterSize: number, fileSize: number, others: readonly Range[]): void {
  if (r.start % clusterSize !== 0) throw new CorruptImageError(`qcow2 header: ${r.what} offset ${r.start} is not cluster aligned`);
  if (r.start === 0 && r.end > r.start) throw new CorruptImageError(`qcow2 header: ${r.what} overlaps the header`);
  if (r.end > fileSize) throw new CorruptImageError(`qcow2 header: ${r.what} [${r.start}, ${r.end}) is past end of file (${fileSize})`);
  for (const o of others) {
    if (r.start < o.end && o.start < r.end) throw new CorruptImageError(`qcow2 header: ${r.what} overlaps the ${o.what}`);
  }
}

/**
 * Decode and validate the header in `cluster0` (the image's first cluster, or fewer bytes if the
 * file is shorter). `fileSize` bounds every table. Throws CorruptImageError for inconsistent
 * fields and UnsupportedImageError for features this driver refuses.
 */
export function decodeQcow2Header(cluster0: Buffer, fileSize: number): Qcow2Header {
  if (cluster0.length < QCOW2_V2_HEADER_BYTES) throw new CorruptImageError('qcow2 header: file too short');
  if (cluster0.readUInt32BE(0) !== QCOW2_MAGIC) throw new CorruptImageError('qcow2 header: bad magic');
  const version = cluster0.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new UnsupportedImageError(`qcow2 header: unsupported version ${version}`);
  const clusterBits = cluster0.readUInt32BE(20);
  if (clusterBits < QCOW2_MIN_CLUSTER_BITS || clusterBits > QCOW2_MAX_CLUSTER_BITS) {
    throw new CorruptImageError(`qcow2 header: cluster_bits ${clusterBits} is outside ${QCOW2_MIN_CLUSTER_BITS}..${QCOW2_MAX_CLUSTER_BITS}`);
  }
  const clusterSize = 2 ** clusterBits;
  let headerLength = QCOW2_V2_HEADER_BYTES;
  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let compressionByte = 0;
  if (version === 3) {
    if (cluster0.length < QCOW2_V3_HEADER_BYTES) throw new CorruptImageError('qcow2 header: file too short for a version 3 header');
    incompatibleFeatures = cluster0.readBigUInt64BE(72);
    compatibleFeatures = cluster0.readBigUInt64BE(80);
    autoclearFeatures = cluster0.readBigUInt64BE(88);
    refcountOrder = cluster0.readUInt32BE(96);
    headerLength = cluster0.readUInt32BE(100);
    // "For version 3 it's at least 104 bytes and must be a multiple of 8."
    if (headerLength < QCOW2_V3_HEADER_BYTES || headerLength % 8 !== 0) {
      throw new CorruptImageError(`qcow2 header: header_length ${headerLength} is invalid`);
    }
    if (headerLength > clusterSize || headerLength > cluster0.length) {
      throw new CorruptImageError(`qcow2 header: header_length ${headerLength} is past the first cluster`);
    }
    if (headerLength > 104) compressionByte = cluster0[104]!;
  }
  if (refcountOrder > 6) throw new CorruptImageError(`qcow2 header: refcount_order ${refcountOrder} is above 6`);

  const sizeBytes = u64Field(cluster0, 24, 'size');
  const cryptMethod = cluster0.readUInt32BE(32);
  const l1Size = cluster0.readUInt32BE(36);
  const l1TableOffset = u64Field(cluster0, 40, 'l1_table_offset');
  const refcountTableOffset = u64Field(cluster0, 48, 'refcount_table_offset');
  const refcountTableClusters = cluster0.readUInt32BE(56);
  const nbSnapshots = cluster0.readUInt32BE(60);
  const snapshotsOffset = u64Field(cluster0, 64, 'snapshots_offset');
  const backingFileOffset = u64Field(cluster0, 8, 'backing_file_offset');
  const backingFileSize = cluster0.readUInt32BE(16);

  if (backingFileOffset !== 0 && backingFileOffset < headerLength) throw new CorruptImageError('qcow2 header: backing file name overlaps the header');
  // Extensions come first: the feature name table names unknown bits in the errors below.
  const extensions: Qcow2Extension[] = [];
  const featureNames: Qcow2FeatureName[] = [];
  let backingFormat: string | null = null;
  let dataFile: string | null = null;
  let bitmapsExtension: Buffer | null = null;
  const extEnd = backingFileOffset > 0 && backingFileOffset < clusterSize ? Math.min(backingFileOffset, cluster0.length) : Math.min(clusterSize, cluster0.length);
  const seen = new Set<number>();
  for (let pos = headerLength; ; ) {
    if (pos + 8 > extEnd) throw new CorruptImageError('qcow2 header: header extensions run past the first cluster');
    const type = cluster0.readUInt32BE(pos);
    const len = cluster0.readUInt32BE(pos + 4);
    if (type === QCOW2_EXT.END) break;
    const dataOffset = pos + 8;
    if (len > extEnd - dataOffset) throw new CorruptImageError(`qcow2 header: extension 0x${type.toString(16)} length ${len} runs past the first cluster`);
    const data = Buffer.from(cluster0.subarray(dataOffset, dataOffset + len));
    if (seen.has(type)) throw new CorruptImageError(`qcow2 header: extension 0x${type.toString(16)} appears twice`);
    seen.add(type);
    extensions.push({ type, dataOffset, data });
    switch (type) {
      case QCOW2_EXT.BACKING_FORMAT:
        backingFormat = data.toString('latin1');
        break;
      case QCOW2_EXT.DATA_FILE:
        dataFile = data.toString('latin1');
        break;
      case QCOW2_EXT.BITMAPS:
        bitmapsExtension = data;
        break;
      case QCOW2_EXT.FEATURE_TABLE:
        for (let e = 0; e + 48 <= len; e += 48) {
          const ftype = data[e]!;
          if (ftype > 2) continue;
          const raw = data.subarray(e + 2, e + 48);
          const nul = raw.indexOf(0);
          featureNames.push({ type: ftype as 0 | 1 | 2, bit: data[e + 1]!, name: raw.subarray(0, nul < 0 ? raw.length : nul).toString('latin1') });
        }
        break;
      default:
        break;
    }
    pos = dataOffset + Math.ceil(len / 8) * 8;
  }

  // "An implementation must fail to open an image if an unknown bit is set."
  const unknown = incompatibleFeatures & ~QCOW2_INCOMPAT_KNOWN;
  if (unknown !== 0n) throw new UnsupportedImageError(`qcow2: unsupported incompatible feature ${describeBits(unknown, 0, featureNames)}`);
  if (cryptMethod !== 0) {
    throw new UnsupportedImageError(`qcow2: encryption (crypt_method ${cryptMethod}${cryptMethod === 1 ? ', AES' : cryptMethod === 2 ? ', LUKS' : ''}) is not supported`);
  }
  const extL2 = (incompatibleFeatures & QCOW2_INCOMPAT.EXTL2) !== 0n;
  if (extL2 && clusterBits < 14) throw new CorruptImageError(`qcow2 header: extended L2 entries need cluster_bits >= 14, not ${clusterBits}`);
  // "If the incompatible bit "Compression type" is set: the field must be present and non-zero."
  const hasCompressionBit = (incompatibleFeatures & QCOW2_INCOMPAT.COMPRESSION) !== 0n;
  if (hasCompressionBit !== (compressionByte !== 0)) {
    throw new CorruptImageError(`qcow2 header: compression_type ${compressionByte} disagrees with the compression type feature bit`);
  }
  if (compressionByte > 1) throw new UnsupportedImageError(`qcow2: unknown compression_type ${compressionByte}`);
  if ((autoclearFeatures & QCOW2_AUTOCLEAR.DATA_FILE_RAW) !== 0n && (incompatibleFeatures & QCOW2_INCOMPAT.DATA_FILE) === 0n) {
    throw new CorruptImageError('qcow2 header: raw external data bit set without an external data file');
  }

  let backingFile: string | null = null;
  if (backingFileOffset !== 0) {
    if (backingFileSize > QCOW2_MAX_BACKING_NAME_BYTES) throw new CorruptImageError(`qcow2 header: backing file name length ${backingFileSize} is above ${QCOW2_MAX_BACKING_NAME_BYTES}`);
    if (backingFileOffset + backingFileSize > clusterSize || backingFileOffset + backingFileSize > cluster0.length) {
      throw new CorruptImageError('qcow2 header: backing file name runs past the first cluster');
    }
    backingFile = cluster0.subarray(backingFileOffset, backingFileOffset + backingFileSize).toString('utf8');
  }

  const entryBytes = extL2 ? 16 : 8;
  if (l1Size * 8 > QCOW2_MAX_L1_BYTES) throw new CorruptImageError(`qcow2 header: l1_size ${l1Size} is above the ${QCOW2_MAX_L1_BYTES / 8}-entry limit`);
  if (l1Size < l1EntriesFor(sizeBytes, clusterBits, entryBytes)) throw new CorruptImageError(`qcow2 header: l1_size ${l1Size} is too small for size ${sizeBytes}`);
  if (refcountTableClusters === 0 || refcountTableOffset === 0) throw new CorruptImageError('qcow2 header: refcount table is missing');
  if (refcountTableClusters * clusterSize > QCOW2_MAX_REFTABLE_BYTES) {
    throw new CorruptImageError(`qcow2 header: refcount table of ${refcountTableClusters} clusters is above the ${QCOW2_MAX_REFTABLE_BYTES}-byte limit`);
  }
  if (nbSnapshots > QCOW2_MAX_SNAPSHOTS) throw new CorruptImageError(`qcow2 header: nb_snapshots ${nbSnapshots} is above ${QCOW2_MAX_SNAPSHOTS}`);
  const header: Range = { what: 'header', start: 0, end: clusterSize };
  const reftable: Range = { what: 'refcount table', start: refcountTableOffset, end: refcountTableOffset + refcountTableClusters * clusterSize };
  checkTableRange(reftable, clusterSize, fileSize, [header]);
  const l1: Range = { what: 'L1 table', start: l1TableOffset, end: l1TableOffset + l1Size * 8 };
  if (l1Size > 0 || l1TableOffset !== 0) checkTableRange(l1, clusterSize, fileSize, [header, reftable]);
  if (nbSnapshots > 0) {
    // The table's length is only known while parsing it; its first entry must at least fit.
    const snap: Range = { what: 'snapshot table', start: snapshotsOffset, end: snapshotsOffset + 40 };
    checkTableRange(snap, clusterSize, fileSize, [header, reftable, l1]);
  } else if (snapshotsOffset % clusterSize !== 0) {
    throw new CorruptImageError(`qcow2 header: snapshot table offset ${snapshotsOffset} is not cluster aligned`);
  }
  if ((autoclearFeatures & QCOW2_AUTOCLEAR.BITMAPS) !== 0n && bitmapsExtension === null && version === 3) {
    // "It is an error if this bit is set without the bitmaps extension present." QEMU tolerates it
    // by clearing the bit on a writable open; we do the same (see driver) rather than refuse.
  }

  return {
    version,
    clusterBits,
    clusterSize,
    sizeBytes,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType: compressionByte as Qcow2CompressionType,
    backingFileOffset,
    backingFile,
    backingFormat,
    dataFile,
    featureNames,
    bitmapsExtension,
    extensions,
  };
}

/** QEMU's feature name table, written into every v3 image we create. */
export const QCOW2_FEATURE_NAMES: readonly Qcow2FeatureName[] = [
  { type: 0, bit: 0, name: 'dirty bit' },
  { type: 0, bit: 1, name: 'corrupt bit' },
  { type: 0, bit: 2, name: 'external data file' },
  { type: 0, bit: 3, name: 'compression type' },
  { type: 0, bit: 4, name: 'extended L2 entries' },
  { type: 1, bit: 0, name: 'lazy refcounts' },
  { type: 2, bit: 0, name: 'bitmaps' },
  { type: 2, bit: 1, name: 'raw external data' },
];

export interface Qcow2HeaderFields {
  readonly version: 2 | 3;
  readonly clusterBits: number;
  readonly sizeBytes: number;
  readonly l1Size: number;
  readonly l1TableOffset: number;
  readonly refcountTableOffset: number;
  readonly refcountTableClusters: number;
  readonly nbSnapshots: number;
  readonly snapshotsOffset: number;
  readonly incompatibleFeatures: bigint;
  readonly compatibleFeatures: bigint;
  readonly autoclearFeatures: bigint;
  readonly refcountOrder: number;
  readonly compressionType: Qcow2CompressionType;
  readonly backingFile: string | null;
  readonly backingFormat: string | null;
  readonly dataFile: string | null;
}

/** Encode a complete first cluster (header, extensions, backing file name) for a new image. */
export function encodeQcow2Header(f: Qcow2HeaderFields): Buffer {
  const clusterSize = 2 ** f.clusterBits;
  const buf = Buffer.alloc(clusterSize);
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(f.version, 4);
  buf.writeUInt32BE(f.clusterBits, 20);
  writeU64(buf, f.sizeBytes, 24);
  buf.writeUInt32BE(f.l1Size, 36);
  writeU64(buf, f.l1TableOffset, 40);
  writeU64(buf, f.refcountTableOffset, 48);
  buf.writeUInt32BE(f.refcountTableClusters, 56);
  buf.writeUInt32BE(f.nbSnapshots, 60);
  writeU64(buf, f.snapshotsOffset, 64);
  let pos = QCOW2_V2_HEADER_BYTES;
  if (f.version === 3) {
    buf.writeBigUInt64BE(f.incompatibleFeatures, 72);
    buf.writeBigUInt64BE(f.compatibleFeatures, 80);
    buf.writeBigUInt64BE(f.autoclearFeatures, 88);
    buf.writeUInt32BE(f.refcountOrder, 96);
    buf.writeUInt32BE(112, 100);
    buf[104] = f.compressionType;
    pos = 112;
  } else if (f.refcountOrder !== 4 || f.incompatibleFeatures !== 0n || f.compatibleFeatures !== 0n) {
    throw new UnsupportedImageError('qcow2 version 2 supports no feature bits and only 16-bit refcounts');
  }
  const putExt = (type: number, data: Buffer): void => {
    const padded = Math.ceil(data.length / 8) * 8;
    if (pos + 8 + padded + 8 > clusterSize) throw new UnsupportedImageError('qcow2 header extensions do not fit in the first cluster');
    buf.writeUInt32BE(type, pos);
    buf.writeUInt32BE(data.length, pos + 4);
    data.copy(buf, pos + 8);
    pos += 8 + padded;
  };
  if (f.backingFormat !== null) putExt(QCOW2_EXT.BACKING_FORMAT, Buffer.from(f.backingFormat, 'latin1'));
  if (f.dataFile !== null) putExt(QCOW2_EXT.DATA_FILE, Buffer.from(f.dataFile, 'latin1'));
  if (f.version === 3) {
    const table = Buffer.alloc(QCOW2_FEATURE_NAMES.length * 48);
    QCOW2_FEATURE_NAMES.forEach((n, i) => {
      table[i * 48] = n.type;
      table[i * 48 + 1] = n.bit;
      table.write(n.name, i * 48 + 2, 46, 'latin1');
    });
    putExt(QCOW2_EXT.FEATURE_TABLE, table);
  }
  pos += 8; // end-of-extensions marker (zeros)
  if (f.backingFile !== null) {
    const name = Buffer.from(f.backingFile, 'utf8');
    if (name.length > QCOW2_MAX_BACKING_NAME_BYTES || pos + name.length > clusterSize) {
      throw new UnsupportedImageError(`qcow2 backing file name of ${name.length} bytes does not fit`);
    }
    writeU64(buf, pos, 8);
    buf.writeUInt32BE(name.length, 16);
    name.copy(buf, pos);
  }
  return buf;
}
