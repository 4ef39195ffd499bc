// commit: write what an overlay (and, with a deeper base, every image between) holds into a
// backing file of its chain, then empty the overlay (qemu-img.rst "commit"). Only ranges
// allocated above the base are copied, read through the overlay so the topmost data wins; a
// base smaller than the overlay is grown first. -b implies keeping the overlay, as in QEMU:
// the images between would otherwise no longer be valid under it.

import { realpath } from 'node:fs/promises';
import '../formats/registry.js';
import { Backend } from '../block/backend.js';
import type { BlockDevice } from '../block/device.js';
import { walkMap } from '../block/walk.js';
import { UnsupportedImageError, UsageError } from '../errors.js';
import { openImageWithFormat } from '../formats/open.js';
import { HostFile } from '../io/host-file.js';
import { readChain } from './chain.js';
import { emptyOverlay } from './empty.js';
import { deviceTarget, transfer } from './transfer.js';

export interface CommitOptions {
  readonly overlay: string;
  readonly format?: string;
  /** An image of the overlay's backing chain; default its backing file. */
  readonly base?: string;
  /** Do not empty the overlay (qemu-img commit -d). */
  readonly keep?: boolean;
  readonly allowBacking?: readonly string[] | boolean;
  readonly workers?: number;
  readonly onProgress?: (doneBytes: number, totalBytes: number) => void;
}

export interface CommitResult {
  readonly base: string;
  readonly baseFormat: string;
  readonly writtenBytes: number;
  readonly zeroedBytes: number;
  readonly emptied: boolean;
}

interface Resizable {
  resize(sizeBytes: number): Promise<void>;
}

function isResizable(d: BlockDevice): d is BlockDevice & Resizable {
  return typeof (d as Partial<Resizable>).resize === 'function';
}

export async function commitImage(o: CommitOptions): Promise<CommitResult> {
  const chain = await readChain(o.overlay, o.format);
  if (chain.length < 2) throw new UsageError(`${o.overlay} has no backing file to commit into`);
  let baseIndex = 1;
  if (o.base !== undefined) {
    const want = await realpath(o.base);
    baseIndex = -1;
    for (let i = 1; i < chain.length; i++) if ((await realpath(chain[i]!.path)) === want) baseIndex = i;
    if (baseIndex < 0) throw new UsageError(`${o.base} is not in the backing chain of ${o.overlay}`);
  }
  const base = chain[baseIndex]!;
  const allow = o.allowBacking !== undefined ? { allowBacking: o.allowBacking } : {};
  const top = (await openImageWithFormat(o.overlay, { format: chain[0]!.format, readOnly: true, ...allow })).device;
  let baseDev: BlockDevice | undefined;
  let topOpen = true;
  try {
    const sizeBytes = top.sizeBytes;
    if (base.format === 'raw') {
      const f = await HostFile.open(base.path, { readOnly: false });
      try {
        if ((await f.size()) < sizeBytes) await f.truncate(sizeBytes);
      } finally {
        await f.close();
      }
    }
    baseDev = (await openImageWithFormat(base.path, { format: base.format, readOnly: false, ...allow })).device;
    if (baseDev.sizeBytes < sizeBytes) {
      if (!isResizable(baseDev)) throw new UnsupportedImageError(`${base.path} (${base.format}) is smaller than ${o.overlay} and cannot be grown`);
      await baseDev.resize(sizeBytes);
    }
    const backend = new Backend(baseDev);
    // qemu:allocation-depth: 1 is the overlay itself, N+1 the Nth backing file; the base is baseIndex+1.
    const above = async function* (start: number, end: number): AsyncGenerator<{ offset: number; length: number }> {
      for await (const m of walkMap(top, start, end)) if (m.depth >= 1 && m.depth <= baseIndex) yield { offset: m.offset, length: m.length };
    };
    const stats = await transfer({
      sources: [top],
      targets: [deviceTarget(backend)],
      requestBytes: 2 * 1024 * 1024,
      workers: o.workers ?? 8,
      grainBytes: Math.min(2 * 1024 * 1024, Math.max(4096, baseDev.blockSizes().preferred)),
      targetZeroed: false,
      include: above,
      onProgress: (d) => o.onProgress?.(d, sizeBytes),
    });
    await backend.flush();
    await baseDev.close();
    baseDev = undefined;
    topOpen = false;
    await top.close();
    const emptied = o.keep !== true && o.base === undefined;
    if (emptied) await emptyOverlay(chain[0]!.path, chain[0]!.format);
    return { base: base.path, baseFormat: base.format, writtenBytes: stats.writtenBytes, zeroedBytes: stats.zeroedBytes, emptied };
  } finally {
    await baseDev?.close();
    if (topOpen) await top.close();
  }
}
