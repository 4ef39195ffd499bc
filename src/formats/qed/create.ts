// Creating QED images with qemu-img's layout (QEMU block/qed.c, bdrv_qed_co_create):
//   cluster 0          header, then the backing file name right after the 64-byte header
//   cluster 1..        the L1 table (table_size clusters, all zero)
// header_size is 1 cluster; a raw backing format sets QED_F_BACKING_FORMAT_NO_PROBE (QED has no
// field for any other format, so those are probed when the image is opened).

import { UsageError } from '../../errors.js';
import { HostFile } from '../../io/host-file.js';
import {
  encodeQedHeader,
  isPowerOfTwo,
  isValidImageSize,
  QED_DEFAULT_CLUSTER_SIZE,
  QED_DEFAULT_TABLE_SIZE,
  QED_F,
  QED_HEADER_BYTES,
  QED_MAX_BACKING_NAME_BYTES,
  QED_MAX_CLUSTER_SIZE,
  QED_MAX_TABLE_BYTES,
  QED_MAX_TABLE_SIZE,
  QED_MIN_CLUSTER_SIZE,
  QED_MIN_TABLE_SIZE,
} from './header.js';

export interface QedCreateOptions {
  readonly sizeBytes: number;
  /** Cache mode "unsafe" (convert -t unsafe): the new file is not flushed. */
  readonly cacheUnsafe?: boolean;
  readonly clusterSize?: number;
  /** Clusters per L1/L2 table. */
  readonly tableSize?: number;
  readonly backingFile?: string;
  readonly backingFormat?: string;
}

/** Create (or overwrite) a QED image at `path`. */
export async function createQed(path: string, o: QedCreateOptions): Promise<void> {
  const clusterSize = o.clusterSize ?? QED_DEFAULT_CLUSTER_SIZE;
  const tableSize = o.tableSize ?? QED_DEFAULT_TABLE_SIZE;
  if (!isPowerOfTwo(clusterSize) || clusterSize < QED_MIN_CLUSTER_SIZE || clusterSize > QED_MAX_CLUSTER_SIZE) {
    throw new UsageError(`qed: cluster size ${clusterSize} must be a power of two from 4K to 64M`);
  }
  if (!isPowerOfTwo(tableSize) || tableSize < QED_MIN_TABLE_SIZE || tableSize > QED_MAX_TABLE_SIZE) {
    throw new UsageError(`qed: table size ${tableSize} must be a power of two from 1 to 16`);
  }
  if (clusterSize * tableSize > QED_MAX_TABLE_BYTES) throw new UsageError(`qed: tables of ${clusterSize * tableSize} bytes exceed the ${QED_MAX_TABLE_BYTES}-byte limit`);
  if (!Number.isSafeInteger(o.sizeBytes) || o.sizeBytes < 0) throw new UsageError(`qed: invalid size ${o.sizeBytes}`);
  // qemu-img rounds sizes up to whole sectors.
  const imageSize = Math.ceil(o.sizeBytes / 512) * 512;
  if (!isValidImageSize(imageSize, clusterSize, tableSize)) throw new UsageError(`qed: size ${imageSize} is more than cluster size ${clusterSize} and table size ${tableSize} can map`);
  if (o.backingFormat !== undefined && o.backingFile === undefined) throw new UsageError('qed: a backing format needs a backing file');

  let features = 0;
  let name = Buffer.alloc(0);
  if (o.backingFile !== undefined) {
    name = Buffer.from(o.backingFile, 'utf8');
    if (name.length === 0 || name.includes(0)) throw new UsageError('qed: the backing file name must be non-empty and contain no NUL');
    if (name.length > QED_MAX_BACKING_NAME_BYTES || QED_HEADER_BYTES + name.length > clusterSize) {
      throw new UsageError(`qed: backing file name of ${name.length} bytes does not fit in the ${clusterSize}-byte header cluster`);
    }
    features |= QED_F.BACKING_FILE;
    if (o.backingFormat === 'raw') features |= QED_F.BACKING_FORMAT_NO_PROBE;
  }
  const header = encodeQedHeader({
    clusterSize,
    tableSize,
    headerSize: 1,
    features,
    compatFeatures: 0n,
    autoclearFeatures: 0n,
    l1TableOffset: clusterSize,
    imageSize,
    backingFilenameOffset: name.length > 0 ? QED_HEADER_BYTES : 0,
    backingFilenameSize: name.length,
  });

  const file = await HostFile.open(path, { create: true, ignoreFlush: o.cacheUnsafe === true });
  try {
    await file.truncate(0);
    const head = Buffer.alloc(clusterSize);
    header.copy(head, 0);
    name.copy(head, QED_HEADER_BYTES);
    await file.pwrite(head, 0);
    // The L1 table: zeros, as a sized (sparse) tail rather than a written buffer.
    await file.truncate(clusterSize + clusterSize * tableSize);
    await file.datasync();
  } finally {
    await file.close();
  }
}
