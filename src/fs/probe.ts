// Filesystem detection by superblock magic, so a partition can be mounted with an explicit
// type. Reads are bounded: the first 4 KiB, 4 KiB at 64 KiB (btrfs), 10 bytes at the end of
// each possible swap page, and for FAT the root directory (bounded in vfat-label.ts). Like blkid (and mount, which refuses an "ambivalent"
// device), two different signatures on one volume are an error rather than a guess.

import type { BlockDevice } from '../block/device.js';
import { CorruptImageError, UnsupportedImageError } from '../errors.js';
import { BTRFS_SUPER_BYTES, BTRFS_SUPER_OFFSET, probeBtrfs } from './btrfs.js';
import { probeErofs } from './erofs.js';
import { probeExt } from './ext.js';
import { probeLuks } from './luks.js';
import { probeSquashfs } from './squashfs.js';
import { probeSwap, SWAP_PAGE_SIZES } from './swap.js';
import { UNMOUNTABLE_TYPES, type ProbeResult } from './types.js';
import { probeVfat } from './vfat.js';
import { readFatRootLabel } from './vfat-label.js';
import { probeXfs } from './xfs.js';

export type { FilesystemType, ProbeResult } from './types.js';

const HEAD_BYTES = 4096;

/** Read up to `length` bytes at `offset`; the part past the device's end stays zero. */
async function readClamped(dev: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  const n = Math.max(0, Math.min(length, dev.sizeBytes - offset));
  if (n > 0) await dev.pread(buf.subarray(0, n), offset);
  return buf;
}

/**
 * Identify the filesystem (or swap / LUKS volume) on `dev`; null when nothing is recognised.
 * Throws CorruptImageError when signatures of two different types are present.
 */
export async function probeFilesystem(dev: BlockDevice): Promise<ProbeResult | null> {
  const head = await readClamped(dev, 0, HEAD_BYTES);
  const found: ProbeResult[] = [];
  const add = (r: ProbeResult | null): void => {
    if (r) found.push(r);
  };
  add(probeLuks(head));
  add(probeXfs(head));
  add(probeExt(head));
  add(probeSquashfs(head));
  add(probeErofs(head));
  const vfat = probeVfat(head);
  if (vfat) {
    // blkid's LABEL is the root directory entry; the boot sector copy may be stale.
    const { label: _bootLabel, ...rest } = vfat;
    const label = await readFatRootLabel(dev, head);
    add(label === undefined ? rest : { ...rest, label });
  }
  if (dev.sizeBytes >= BTRFS_SUPER_OFFSET + BTRFS_SUPER_BYTES) {
    add(probeBtrfs(await readClamped(dev, BTRFS_SUPER_OFFSET, BTRFS_SUPER_BYTES)));
  }
  for (const page of SWAP_PAGE_SIZES) {
    if (page > dev.sizeBytes) break;
    const tail = page <= HEAD_BYTES ? head.subarray(page - 10, page) : await readClamped(dev, page - 10, 10);
    const swap = probeSwap(tail, head);
    if (swap) {
      found.push(swap);
      break;
    }
  }
  if (found.length > 1) {
    throw new CorruptImageError(
      `ambiguous volume: signatures of ${found.map((r) => r.type).join(' and ')} are both present; wipe the stale one (wipefs) before using it`,
    );
  }
  return found[0] ?? null;
}

/**
 * Probe `dev` for a filesystem that can be mounted. `what` names the volume in messages
 * (e.g. "partition 2 of disk.qcow2"). Swap, hibernation images, LUKS volumes, external ext
 * journals and unrecognised contents are refused with UnsupportedImageError saying which.
 */
export async function probeMountableFilesystem(dev: BlockDevice, what: string): Promise<ProbeResult> {
  const r = await probeFilesystem(dev);
  if (!r) throw new UnsupportedImageError(`${what} holds no recognised filesystem (looked for ext2/3/4, xfs, btrfs, vfat, squashfs, erofs)`);
  if (UNMOUNTABLE_TYPES.has(r.type)) {
    const why: Record<string, string> = {
      swap: 'is a swap area, not a filesystem',
      swsuspend: 'is a swap area holding a hibernation image, not a filesystem',
      crypto_LUKS: 'is a LUKS encrypted volume; open it with cryptsetup and use the decrypted device',
      jbd: 'is an external ext3/ext4 journal, not a filesystem',
    };
    throw new UnsupportedImageError(`${what} ${why[r.type]}`);
  }
  if (r.type === 'squashfs3') {
    throw new UnsupportedImageError(`${what} is SquashFS ${r.version ?? ''} (before 4.0), which Linux no longer mounts`);
  }
  return r;
}
