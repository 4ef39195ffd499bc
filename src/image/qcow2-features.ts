// Flipping the qcow2 lazy_refcounts compatible feature (qcow2.txt "Header", compatible_features
// bit 0, a u64 BE at byte 80 of a version 3 header) on a closed, clean image. convert writes a
// fresh image with it on, so that allocating writes need no flush each (nobody can see the image
// before it is complete, and the final close writes every refcount), then turns it off again.

import { UnsupportedImageError } from '../errors.js';
import { HostFile } from '../io/host-file.js';
import { QCOW2_COMPAT_LAZY_REFCOUNTS, QCOW2_INCOMPAT, QCOW2_MAGIC } from '../formats/qcow2/header.js';

const COMPATIBLE_FEATURES_OFFSET = 80;
const INCOMPATIBLE_FEATURES_OFFSET = 72;

export async function setQcow2LazyRefcounts(path: string, on: boolean, opts: { cacheUnsafe?: boolean } = {}): Promise<void> {
  const file = await HostFile.open(path, { readOnly: false, ignoreFlush: opts.cacheUnsafe === true });
  try {
    const h = Buffer.alloc(104);
    await file.pread(h, 0);
    if (h.readUInt32BE(0) !== QCOW2_MAGIC || h.readUInt32BE(4) !== 3) throw new UnsupportedImageError(`${path}: not a qcow2 version 3 image`);
    // Turning lazy refcounts off on a dirty image would hide refcounts that need a rebuild.
    if (!on && (h.readBigUInt64BE(INCOMPATIBLE_FEATURES_OFFSET) & QCOW2_INCOMPAT.DIRTY) !== 0n) throw new UnsupportedImageError(`${path} is dirty: its refcounts need a check first`);
    const compat = h.readBigUInt64BE(COMPATIBLE_FEATURES_OFFSET);
    const next = on ? compat | QCOW2_COMPAT_LAZY_REFCOUNTS : compat & ~QCOW2_COMPAT_LAZY_REFCOUNTS;
    if (next === compat) return;
    const field = Buffer.alloc(8);
    field.writeBigUInt64BE(next);
    await file.pwrite(field, COMPATIBLE_FEATURES_OFFSET);
    await file.datasync();
  } finally {
    await file.close();
  }
}
