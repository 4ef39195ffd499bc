// Walking a device's allocation map in bounded steps, for map, copy and convert.

import { EXTENT_HOLE, EXTENT_ZERO, type BlockDevice } from './device.js';

export interface MapEntry {
  readonly offset: number;
  readonly length: number;
  /** EXTENT_HOLE | EXTENT_ZERO bits; 0 is data. */
  readonly flags: number;
  /** qemu:allocation-depth: 0 unallocated, 1 top layer, N the (N-1)th backing file. */
  readonly depth: number;
}

/** Largest range asked of a device in one extents() call (NBD lengths are 32-bit). */
const STEP_BYTES = 2 ** 30;

/** Yield the base:allocation extents of [start, end), coalescing neighbours with equal flags. */
export async function* walkExtents(dev: BlockDevice, start = 0, end = dev.sizeBytes): AsyncGenerator<{ offset: number; length: number; flags: number }> {
  const caps = dev.capabilities();
  if (!caps.extents || !dev.extents) {
    if (end > start) yield { offset: start, length: end - start, flags: 0 };
    return;
  }
  let pending: { offset: number; length: number; flags: number } | undefined;
  let pos = start;
  while (pos < end) {
    const extents = await dev.extents(pos, Math.min(STEP_BYTES, end - pos));
    if (extents.length === 0) throw new Error(`device returned no extents at offset ${pos}`);
    for (const e of extents) {
      const length = Math.min(e.length, end - pos);
      if (length <= 0) break;
      const flags = e.flags & (EXTENT_HOLE | EXTENT_ZERO);
      if (pending && pending.flags === flags && pending.offset + pending.length === pos) {
        pending = { offset: pending.offset, length: pending.length + length, flags };
      } else {
        if (pending) yield pending;
        pending = { offset: pos, length, flags };
      }
      pos += length;
    }
  }
  if (pending) yield pending;
}

async function* walkDepth(dev: BlockDevice, start: number, end: number): AsyncGenerator<{ offset: number; length: number; depth: number }> {
  if (!dev.capabilities().allocationDepth || !dev.allocationDepth) {
    if (end > start) yield { offset: start, length: end - start, depth: 1 };
    return;
  }
  let pos = start;
  while (pos < end) {
    const runs = await dev.allocationDepth(pos, Math.min(STEP_BYTES, end - pos));
    if (runs.length === 0) throw new Error(`device returned no allocation depth at offset ${pos}`);
    for (const r of runs) {
      const length = Math.min(r.length, end - pos);
      if (length <= 0) break;
      yield { offset: pos, length, depth: r.depth };
      pos += length;
    }
  }
}

/** The allocation map with depth: the intersection of base:allocation and allocation depth. */
export async function* walkMap(dev: BlockDevice, start = 0, end = dev.sizeBytes): AsyncGenerator<MapEntry> {
  const depths = walkDepth(dev, start, end);
  let cur = (await depths.next()).value as { offset: number; length: number; depth: number } | undefined;
  let pending: MapEntry | undefined;
  for await (const ext of walkExtents(dev, start, end)) {
    let pos = ext.offset;
    const extEnd = ext.offset + ext.length;
    while (pos < extEnd && cur) {
      const curEnd = cur.offset + cur.length;
      const stop = Math.min(extEnd, curEnd);
      const piece: MapEntry = { offset: pos, length: stop - pos, flags: ext.flags, depth: cur.depth };
      if (pending && pending.flags === piece.flags && pending.depth === piece.depth) {
        pending = { ...pending, length: pending.length + piece.length };
      } else {
        if (pending) yield pending;
        pending = piece;
      }
      pos = stop;
      if (stop === curEnd) cur = (await depths.next()).value as typeof cur;
    }
  }
  if (pending) yield pending;
}
