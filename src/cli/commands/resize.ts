// imgbd resize: qemu-img resize [--shrink] FILE [+|-]SIZE. Growing is always safe; shrinking
// needs --shrink and is refused while the part cut off still holds data, so no data is lost
// by a typo.

import { UsageError } from '../../errors.js';
import type { BlockDevice } from '../../block/device.js';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../block/device.js';
import { HostFile } from '../../io/host-file.js';
import { openImageWithFormat } from '../../formats/open.js';
import { probeFormat, readProbeHead } from '../../formats/probe.js';
import { openQcow2Path } from '../../formats/qcow2/index.js';
import { formatSize, parseSize } from '../parse.js';

interface ResizeOptions {
  format?: string;
  shrink?: boolean;
  quiet?: boolean;
}

/** "10G" absolute, "+1G" / "-1G" relative to `current`. */
export function targetSize(text: string, current: number): number {
  const m = /^([+-]?)(.*)$/.exec(text.trim())!;
  const n = parseSize(m[2]!, 'size');
  const size = m[1] === '+' ? current + n : m[1] === '-' ? current - n : n;
  if (size < 0) throw new UsageError(`${text} would make the image smaller than nothing (it is ${current} bytes)`);
  if (!Number.isSafeInteger(size)) throw new UsageError(`${text}: size too large`);
  return size;
}

/**
 * The first non-zero byte in [from, to) of the image itself, or null. Holes and zero clusters
 * are skipped unread; allocated ranges are read, so a cluster of zeros counts as unused (it
 * stays referenced, so nothing leaks, and reads zeros if the image grows again).
 */
async function firstUsedByte(dev: BlockDevice, from: number, to: number): Promise<number | null> {
  let off = from;
  const buf = Buffer.alloc(1024 * 1024);
  while (off < to) {
    const len = Math.min(to - off, 1024 * 1024 * 1024);
    const extents = dev.extents ? await dev.extents(off, len) : [{ length: len, flags: 0 }];
    let p = off;
    for (const e of extents) {
      if ((e.flags & (EXTENT_HOLE | EXTENT_ZERO)) === 0) {
        // Allocated in a raw file: it counts as used only if it holds a non-zero byte.
        for (let q = p; q < p + e.length; q += buf.length) {
          const n = Math.min(buf.length, p + e.length - q);
          const view = buf.subarray(0, n);
          await dev.pread(view, q);
          const i = view.findIndex((b) => b !== 0);
          if (i >= 0) return q + i;
        }
      }
      p += e.length;
    }
    off = p;
  }
  return null;
}

async function refuseIfUsed(dev: BlockDevice, file: string, newSize: number): Promise<void> {
  const used = await firstUsedByte(dev, newSize, dev.sizeBytes);
  if (used !== null) {
    throw new UsageError(`${file} holds data at byte ${used}, inside the ${dev.sizeBytes - newSize} bytes a shrink to ${newSize} would cut off; move or discard that data first`);
  }
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const o = opts as ResizeOptions;
  const operands = args.filter((a) => a !== '--');
  if (operands.length !== 2) throw new UsageError('usage: imgbd resize [--shrink] FILE [+|-]SIZE (e.g. imgbd resize disk.qcow2 +1G)');
  const [file, sizeText] = operands as [string, string];
  const format = o.format ?? probeFormat(await readProbeHead(file));
  if (format === 'qcow2') {
    const dev = await openQcow2Path(file, { ignoreBacking: true });
    let newSize: number;
    try {
      newSize = Math.ceil(targetSize(sizeText, dev.sizeBytes) / 512) * 512;
      if (newSize >= dev.sizeBytes) {
        await dev.resize(newSize);
        await dev.flush();
      } else {
        if (!o.shrink) throw new UsageError(`shrinking ${file} from ${dev.sizeBytes} to ${newSize} bytes loses what lies past the new end: add --shrink if you mean it`);
        if (dev.snapshots.length > 0) throw new UsageError(`${file} has internal snapshots; qcow2 shrink is refused while they exist (delete them with 'imgbd snapshot -d')`);
        await refuseIfUsed(dev, file, newSize);
      }
    } finally {
      await dev.close();
    }
    if (newSize < dev.sizeBytes) await writeQcow2Size(file, newSize);
    if (!o.quiet) process.stdout.write(`Image resized to ${newSize} bytes (${formatSize(newSize)}).\n`);
    return 0;
  }
  if (format !== 'raw') throw new UsageError(`imgbd resize handles raw and qcow2 images, not ${format}`);
  const opened = await openImageWithFormat(file, { format: 'raw', readOnly: true });
  let newSize: number;
  try {
    newSize = targetSize(sizeText, opened.device.sizeBytes);
    if (newSize < opened.device.sizeBytes) {
      if (!o.shrink) throw new UsageError(`shrinking ${file} from ${opened.device.sizeBytes} to ${newSize} bytes loses what lies past the new end: add --shrink if you mean it`);
      await refuseIfUsed(opened.device, file, newSize);
    }
  } finally {
    await opened.device.close();
  }
  const f = await HostFile.open(file, {});
  try {
    await f.truncate(newSize);
    await f.datasync();
  } finally {
    await f.close();
  }
  if (!o.quiet) process.stdout.write(`Image resized to ${newSize} bytes (${formatSize(newSize)}).\n`);
  return 0;
}

/**
 * Shrink a qcow2 image whose cut-off part is unallocated: only the virtual size (header bytes
 * 24-31, big-endian) changes. The L1 table may stay larger than the new size needs ("the L1
 * table may be larger than required", as QEMU's open accepts), and every L2 entry past the new
 * end was verified unallocated, so nothing is leaked or exposed if the image grows again.
 */
async function writeQcow2Size(file: string, sizeBytes: number): Promise<void> {
  const f = await HostFile.open(file, {});
  try {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(sizeBytes));
    await f.pwrite(b, 24);
    await f.datasync();
  } finally {
    await f.close();
  }
}
