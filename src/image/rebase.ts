// rebase: give an overlay a new backing file (qemu-img.rst "rebase"). Safe mode keeps what the
// guest sees: wherever the overlay does not hold data itself, the old chain's data is copied
// into it when the new backing file reads differently there; then the header is rewritten.
// Unsafe mode (-u) only rewrites the header. An empty new name removes the backing file.

import '../formats/registry.js';
import type { BlockDevice } from '../block/device.js';
import { walkMap } from '../block/walk.js';
import { UsageError } from '../errors.js';
import { openImageWithFormat } from '../formats/open.js';
import { writeBackingReference } from './backing-header.js';
import { detectFormat, readChain, resolveBackingName } from './chain.js';
import { zeroRuns } from './zero.js';

export interface RebaseOptions {
  readonly overlay: string;
  readonly format?: string;
  /** The new backing file as it will be recorded ('' or null: none). */
  readonly backing: string | null;
  readonly backingFormat?: string;
  readonly unsafe?: boolean;
  readonly allowBacking?: readonly string[] | boolean;
  readonly onProgress?: (doneBytes: number, totalBytes: number) => void;
}

export interface RebaseResult {
  readonly backingFile: string | null;
  readonly backingFormat: string | null;
  /** Bytes copied into the overlay (safe mode). */
  readonly copiedBytes: number;
}

const CHUNK_BYTES = 1024 * 1024;

export async function rebaseImage(o: RebaseOptions): Promise<RebaseResult> {
  const chain = await readChain(o.overlay, o.format);
  const top = chain[0]!;
  if (top.format !== 'qcow2' && top.format !== 'qed') throw new UsageError(`${top.format} images have no backing file to change`);
  const name = o.backing === '' ? null : o.backing;
  const newPath = name === null ? null : resolveBackingName(top.path, name);
  let newFormat: string | null = name === null ? null : (o.backingFormat ?? null);
  if (newPath !== null && newFormat === null) {
    try {
      newFormat = await detectFormat(newPath);
    } catch (err) {
      if (!o.unsafe) throw err;
    }
  }
  let copied = 0;
  if (!o.unsafe) copied = await copyDifferences(o, top.format, newPath, newFormat);
  await writeBackingReference(top.path, top.format, { backingFile: name, backingFormat: newFormat });
  return { backingFile: name, backingFormat: newFormat, copiedBytes: copied };
}

async function copyDifferences(o: RebaseOptions, format: string, newPath: string | null, newFormat: string | null): Promise<number> {
  const allow = o.allowBacking !== undefined ? { allowBacking: o.allowBacking } : {};
  const overlay = (await openImageWithFormat(o.overlay, { format, readOnly: false, ...allow })).device;
  let next: BlockDevice | undefined;
  let copied = 0;
  try {
    if (newPath !== null) next = (await openImageWithFormat(newPath, { format: newFormat ?? undefined, readOnly: true, allowBacking: true })).device;
    const grain = Math.min(CHUNK_BYTES, Math.max(512, overlay.blockSizes().preferred));
    const oldBuf = Buffer.allocUnsafe(CHUNK_BYTES);
    const newBuf = Buffer.allocUnsafe(CHUNK_BYTES);
    const size = overlay.sizeBytes;
    for await (const m of walkMap(overlay)) {
      // Depth 1: the overlay holds the data itself, whatever its backing file.
      if (m.depth === 1) continue;
      for (let off = m.offset; off < m.offset + m.length; ) {
        const stop = Math.min(m.offset + m.length, off + CHUNK_BYTES - (off % grain));
        const n = stop - off;
        const was = oldBuf.subarray(0, n);
        const now = newBuf.subarray(0, n);
        await overlay.pread(was, off);
        await readPadded(next, now, off);
        const writes: Promise<void>[] = [];
        for (let a = 0; a < n; ) {
          const b = Math.min(n, a + grain - ((off + a) % grain));
          if (!was.subarray(a, b).equals(now.subarray(a, b))) {
            const piece = was.subarray(a, b);
            const zero = zeroRuns(piece, piece.length)[0]![2];
            writes.push(zero ? overlay.zero!(off + a, b - a, { mayTrim: false }) : overlay.pwrite!(piece, off + a));
            copied += b - a;
          }
          a = b;
        }
        await Promise.all(writes);
        off = stop;
        o.onProgress?.(off, size);
      }
    }
    await overlay.flush?.();
  } finally {
    await next?.close();
    await overlay.close();
  }
  return copied;
}

/** Read what `dev` shows at [offset, offset+buf.length): zeros past its end, or with no device. */
async function readPadded(dev: BlockDevice | undefined, buf: Buffer, offset: number): Promise<void> {
  const have = dev === undefined ? 0 : Math.max(0, Math.min(buf.length, dev.sizeBytes - offset));
  if (have > 0) await dev!.pread(buf.subarray(0, have), offset);
  buf.fill(0, have);
}
