// Creating VDI images with qemu-img's layout (vdi-notes.md, section 6): header at 0, block map at
// 512 rounded up to whole sectors, data right after it (512-aligned, not 1 MiB-aligned). Dynamic
// maps are all VDI_UNALLOCATED; static maps are the identity and the file is extended to hold
// every block (sized, not written).

import { UsageError } from '../../errors.js';
import { HostFile } from '../../io/host-file.js';
import { encodeVdiHeader, VDI_BLOCK_SIZE, VDI_DISK_SIZE_MAX, VDI_HEADER_BYTES, VDI_TYPE, VDI_UNALLOCATED, vdiMapBytes } from './header.js';
import { randomVdiUuid } from './uuid.js';

export interface VdiCreateOptions {
  readonly sizeBytes: number;
  /** Cache mode "unsafe" (convert -t unsafe): the new file is not flushed. */
  readonly cacheUnsafe?: boolean;
  /** Preallocate every block (qemu-img -o static=on). */
  readonly static?: boolean;
}

/** Create (or overwrite) a VDI image at `path`. */
export async function createVdi(path: string, o: VdiCreateOptions): Promise<void> {
  if (!Number.isSafeInteger(o.sizeBytes) || o.sizeBytes < 0) throw new UsageError(`vdi: invalid size ${o.sizeBytes}`);
  const diskSize = Math.ceil(o.sizeBytes / 512) * 512;
  if (diskSize > VDI_DISK_SIZE_MAX) throw new UsageError(`vdi: size ${diskSize} exceeds the maximum ${VDI_DISK_SIZE_MAX}`);
  const isStatic = o.static === true;
  const blocks = Math.ceil(diskSize / VDI_BLOCK_SIZE);
  const mapBytes = vdiMapBytes(blocks);
  const offsetBmap = VDI_HEADER_BYTES;
  const offsetData = offsetBmap + mapBytes;
  const header = encodeVdiHeader({
    imageType: isStatic ? VDI_TYPE.STATIC : VDI_TYPE.DYNAMIC,
    offsetBmap,
    offsetData,
    diskSize,
    blockSize: VDI_BLOCK_SIZE,
    blocksInImage: blocks,
    blocksAllocated: isStatic ? blocks : 0,
    uuidImage: randomVdiUuid(),
    uuidLastSnap: randomVdiUuid(),
  });
  const map = Buffer.alloc(mapBytes);
  for (let i = 0; i < blocks; i++) map.writeUInt32LE(isStatic ? i : VDI_UNALLOCATED, i * 4);

  const file = await HostFile.open(path, { create: true, ignoreFlush: o.cacheUnsafe === true });
  try {
    await file.truncate(0);
    await file.pwrite(header, 0);
    if (blocks > 0) await file.pwrite(map, offsetBmap);
    if (isStatic) await file.truncate(offsetData + blocks * VDI_BLOCK_SIZE);
    await file.datasync();
  } finally {
    await file.close();
  }
}
