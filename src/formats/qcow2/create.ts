// Creating qcow2 images (qemu-img create -f qcow2 semantics): version 2 or 3, any cluster size
// and refcount width, extended L2 entries, lazy refcounts, zstd compression type, a backing file
// with its format, and metadata preallocation.
//
// Layout: cluster 0 header | refcount table | refcount blocks | L1 table | (preallocation:
// L2 tables | data clusters). Every cluster of it has refcount 1.

import { dirname, isAbsolute, resolve } from 'node:path';
import { UsageError } from '../../errors.js';
import { HostFile } from '../../io/host-file.js';
import { fallocate } from '../../sys/libc.js';
import { writeU64 } from '../../util/u64.js';
import {
  encodeQcow2Header,
  l1EntriesFor,
  QCOW2_COMPAT_LAZY_REFCOUNTS,
  QCOW2_COMPRESSION,
  QCOW2_INCOMPAT,
  QCOW2_MAX_CLUSTER_BITS,
  QCOW2_MAX_L1_BYTES,
  QCOW2_MIN_CLUSTER_BITS,
} from './header.js';
import { ALL_SUBCLUSTERS, encodeL1Entry, encodeL2Entry, makeGeometry } from './map.js';
import { writeRefcountEntry } from './refcount.js';

export interface Qcow2CreateOptions {
  readonly sizeBytes: number;
  /** Cache mode "unsafe" (convert -t unsafe): the new file is not flushed. */
  readonly cacheUnsafe?: boolean;
  /** '0.10' makes a version 2 image, '1.1' (default) version 3. */
  readonly compat?: '0.10' | '1.1';
  readonly clusterSize?: number;
  readonly extendedL2?: boolean;
  readonly lazyRefcounts?: boolean;
  readonly compressionType?: 'zlib' | 'zstd';
  readonly refcountBits?: number;
  readonly backingFile?: string;
  readonly backingFormat?: string;
  /**
   * metadata: L2 tables and data clusters mapped; falloc: also reserved on the host
   * (fallocate); full: also written with zeros.
   */
  readonly preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
  /**
   * External data file (incompatible bit 2), named as stored in the image and created, raw,
   * with the virtual size; guest data lives at its guest offset there.
   */
  readonly dataFile?: string;
}

/** Create (or overwrite) a qcow2 image at `path`. */
export async function createQcow2(path: string, o: Qcow2CreateOptions): Promise<void> {
  const version = (o.compat ?? '1.1') === '0.10' ? 2 : 3;
  const clusterSize = o.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < QCOW2_MIN_CLUSTER_BITS || clusterBits > QCOW2_MAX_CLUSTER_BITS) {
    throw new UsageError(`qcow2: cluster size ${clusterSize} must be a power of two from 512 to 2M`);
  }
  const refcountBits = o.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) throw new UsageError(`qcow2: refcount bits ${refcountBits} must be a power of two up to 64`);
  const extL2 = o.extendedL2 ?? false;
  const zstd = (o.compressionType ?? 'zlib') === 'zstd';
  if (version === 2 && (extL2 || o.lazyRefcounts || zstd || refcountBits !== 16)) {
    throw new UsageError('qcow2: compat 0.10 supports neither extended L2, lazy refcounts, zstd nor refcount bits other than 16');
  }
  if (extL2 && clusterBits < 14) throw new UsageError('qcow2: extended L2 entries need a cluster size of at least 16K');
  if (o.backingFormat !== undefined && o.backingFile === undefined) throw new UsageError('qcow2: a backing format needs a backing file');
  if (!Number.isSafeInteger(o.sizeBytes) || o.sizeBytes < 0) throw new UsageError(`qcow2: invalid size ${o.sizeBytes}`);
  const sizeBytes = Math.ceil(o.sizeBytes / 512) * 512;
  const g = makeGeometry(clusterBits, extL2, version);
  const l1Size = l1EntriesFor(sizeBytes, clusterBits, g.l2EntryBytes);
  if (l1Size * 8 > QCOW2_MAX_L1_BYTES) throw new UsageError(`qcow2: size ${sizeBytes} needs an L1 table above the 32 MiB limit`);
  const preallocation = o.preallocation ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(preallocation)) throw new UsageError(`qcow2: preallocation must be off, metadata, falloc or full, not '${preallocation}'`);
  const prealloc = preallocation !== 'off';
  const external = o.dataFile !== undefined;
  if (external && version === 2) throw new UsageError('qcow2: an external data file needs compat 1.1');
  if (external && prealloc) throw new UsageError('qcow2: preallocation with an external data file is not supported by imgbd; create with preallocation=off');

  const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / clusterSize));
  const l2Tables = prealloc ? l1Size : 0;
  const dataClusters = prealloc ? Math.ceil(sizeBytes / clusterSize) : 0;
  const blockEntries = (clusterSize * 8) >> refcountOrder;
  let reftableClusters = 1;
  let blocks = 1;
  let total = 0;
  for (;;) {
    total = 1 + reftableClusters + blocks + l1Clusters + l2Tables + dataClusters;
    const needBlocks = Math.ceil(total / blockEntries);
    const needTable = Math.max(1, Math.ceil((needBlocks * 8) / clusterSize));
    if (needBlocks === blocks && needTable === reftableClusters) break;
    blocks = needBlocks;
    reftableClusters = needTable;
  }
  const reftableOffset = clusterSize;
  const blocksOffset = reftableOffset + reftableClusters * clusterSize;
  const l1Offset = blocksOffset + blocks * clusterSize;
  const l2Offset = l1Offset + l1Clusters * clusterSize;
  const dataOffset = l2Offset + l2Tables * clusterSize;

  let incompat = 0n;
  if (extL2) incompat |= QCOW2_INCOMPAT.EXTL2;
  if (zstd) incompat |= QCOW2_INCOMPAT.COMPRESSION;
  if (external) incompat |= QCOW2_INCOMPAT.DATA_FILE;
  const header = encodeQcow2Header({
    version,
    clusterBits,
    sizeBytes,
    l1Size,
    l1TableOffset: l1Offset,
    refcountTableOffset: reftableOffset,
    refcountTableClusters: reftableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: incompat,
    compatibleFeatures: o.lazyRefcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: 0n,
    refcountOrder,
    compressionType: zstd ? QCOW2_COMPRESSION.ZSTD : QCOW2_COMPRESSION.ZLIB,
    backingFile: o.backingFile ?? null,
    backingFormat: o.backingFormat ?? null,
    dataFile: o.dataFile ?? null,
  });
  if (external) {
    const dataPath = isAbsolute(o.dataFile!) ? o.dataFile! : resolve(dirname(path), o.dataFile!);
    const df = await HostFile.open(dataPath, { create: true, ignoreFlush: o.cacheUnsafe === true });
    try {
      await df.truncate(0);
      await df.truncate(sizeBytes);
      await df.datasync();
    } finally {
      await df.close();
    }
  }

  const file = await HostFile.open(path, { create: true, ignoreFlush: o.cacheUnsafe === true });
  try {
    await file.truncate(0);
    const reftable = Buffer.alloc(reftableClusters * clusterSize);
    for (let i = 0; i < blocks; i++) writeU64(reftable, blocksOffset + i * clusterSize, i * 8);
    await file.pwrite(reftable, reftableOffset);
    for (let i = 0; i < blocks; i++) {
      const block = Buffer.alloc(clusterSize);
      for (let j = 0; j < blockEntries && i * blockEntries + j < total; j++) writeRefcountEntry(block, j, refcountOrder, 1);
      await file.pwrite(block, blocksOffset + i * clusterSize);
    }
    const l1 = Buffer.alloc(l1Clusters * clusterSize);
    let dataIndex = 0;
    for (let i = 0; i < l2Tables; i++) {
      encodeL1Entry(l1, i, l2Offset + i * clusterSize, true);
      const l2 = Buffer.alloc(clusterSize);
      for (let j = 0; j < g.l2Entries && dataIndex < dataClusters; j++, dataIndex++) {
        encodeL2Entry(g, l2, j, { hostOffset: dataOffset + dataIndex * clusterSize, copied: true, alloc: extL2 ? ALL_SUBCLUSTERS : 1, zero: 0 });
      }
      await file.pwrite(l2, l2Offset + i * clusterSize);
    }
    await file.pwrite(l1, l1Offset);
    await file.truncate(total * clusterSize);
    if (dataClusters > 0 && preallocation === 'falloc') await fallocate(file.fd, 0, dataOffset, dataClusters * clusterSize);
    if (dataClusters > 0 && preallocation === 'full') await writeZeros(file, dataOffset, dataClusters * clusterSize);
    // The header goes last: until it is written the file is not a qcow2 image at all.
    await file.datasync();
    await file.pwrite(header, 0);
    await file.datasync();
  } finally {
    await file.close();
  }
}

/** Write real zeros (preallocation=full): the host must hold every byte, not a hole. */
async function writeZeros(file: HostFile, offset: number, length: number): Promise<void> {
  const chunk = Buffer.alloc(Math.min(length, 4 * 1024 * 1024));
  for (let done = 0; done < length; done += chunk.length) {
    const n = Math.min(chunk.length, length - done);
    await file.pwrite(n === chunk.length ? chunk : chunk.subarray(0, n), offset + done);
  }
}
