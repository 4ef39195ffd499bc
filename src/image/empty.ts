// Emptying an overlay after commit (qemu-img commit without -d): every cluster unallocated, so
// the image reads as its backing file again. Done as QEMU's qcow2 make_empty does for an image
// without snapshots: the image is re-created with the same geometry, features and backing file.

import { UnsupportedImageError, UsageError } from '../errors.js';
import { HostFile } from '../io/host-file.js';
import { createQcow2 } from '../formats/qcow2/index.js';
import { QCOW2_COMPAT_LAZY_REFCOUNTS, QCOW2_COMPRESSION, QCOW2_INCOMPAT, QCOW2_V2_HEADER_BYTES, decodeQcow2Header } from '../formats/qcow2/header.js';
import { createQed } from '../formats/qed/create.js';
import { QED_HEADER_BYTES, parseQedHeader } from '../formats/qed/header.js';
import { readBackingReference } from './backing-header.js';

export async function emptyOverlay(path: string, format: string): Promise<void> {
  const ref = await readBackingReference(path, format);
  const backing = ref.backingFile !== null ? { backingFile: ref.backingFile, ...(ref.backingFormat !== null ? { backingFormat: ref.backingFormat } : {}) } : {};
  const file = await HostFile.open(path, { readOnly: true });
  let recreate: () => Promise<void>;
  try {
    const size = await file.size();
    if (format === 'qcow2') {
      const head = Buffer.alloc(QCOW2_V2_HEADER_BYTES);
      await file.pread(head, 0);
      const c0 = Buffer.alloc(2 ** head.readUInt32BE(20));
      await file.pread(c0, 0);
      const h = decodeQcow2Header(c0, size);
      if (h.nbSnapshots > 0) throw new UnsupportedImageError(`${path} has internal snapshots: it is not emptied (their data would be lost)`);
      if (h.dataFile !== null) throw new UnsupportedImageError(`${path} has an external data file: it is not emptied`);
      recreate = () =>
        createQcow2(path, {
          sizeBytes: h.sizeBytes,
          compat: h.version === 2 ? '0.10' : '1.1',
          clusterSize: h.clusterSize,
          extendedL2: (h.incompatibleFeatures & QCOW2_INCOMPAT.EXTL2) !== 0n,
          lazyRefcounts: (h.compatibleFeatures & QCOW2_COMPAT_LAZY_REFCOUNTS) !== 0n,
          compressionType: h.compressionType === QCOW2_COMPRESSION.ZSTD ? 'zstd' : 'zlib',
          refcountBits: 2 ** h.refcountOrder,
          ...backing,
        });
    } else if (format === 'qed') {
      const hb = Buffer.alloc(QED_HEADER_BYTES);
      await file.pread(hb, 0);
      const h = parseQedHeader(hb, size);
      recreate = () => createQed(path, { sizeBytes: h.imageSize, clusterSize: h.clusterSize, tableSize: h.tableSize, ...backing });
    } else {
      throw new UsageError(`${format} images have no backing file to fall back to: nothing to empty`);
    }
  } finally {
    await file.close();
  }
  await recreate();
}
