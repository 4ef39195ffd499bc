// Block status of a qcow2 image: base:allocation extents (data / zero / hole per (sub)cluster,
// unallocated ranges answered by the backing chain) and qemu:allocation-depth, as qemu-nbd
// reports them. Runs of equal status are merged; the walk visits each L2 entry once.

import type { BlockDevice, DepthExtent, Extent } from '../../block/device.js';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../block/device.js';
import { SUB_COMPRESSED, SUB_DATA, SUB_UNALLOCATED, SUB_ZERO, subclusterStatus, type L2Entry, type Qcow2Geometry } from './map.js';

export interface StatusSource {
  readonly geometry: Qcow2Geometry;
  readonly backing: BlockDevice | null;
  entry(cluster: number): Promise<L2Entry>;
  /** The entry without waiting, when it is at hand. */
  entryNow?(cluster: number): L2Entry | undefined;
  /** Clusters from `cluster` on (at most `max`) known at once to share one status; null: ask entry(). */
  runNow?(cluster: number, max: number): { readonly status: number; readonly count: number } | null;
}

/** Visit runs of equal (sub)cluster status; `fn` returns false to stop early. */
export async function walkStatus(src: StatusSource, offset: number, length: number, fn: (pos: number, n: number, status: number) => Promise<boolean>): Promise<void> {
  const g = src.geometry;
  let runStart = offset;
  let runStatus = -1;
  let pos = offset;
  const end = offset + length;
  while (pos < end) {
    const cluster = Math.floor(pos / g.clusterSize);
    // Long stretches of data or of nothing are the common case: taken a run at a time.
    const run = pos % g.clusterSize === 0 ? src.runNow?.(cluster, Math.ceil((end - pos) / g.clusterSize)) : null;
    if (run) {
      if (runStatus !== run.status) {
        if (runStatus >= 0 && !(await fn(runStart, pos - runStart, runStatus))) return;
        runStart = pos;
        runStatus = run.status;
      }
      pos = Math.min(end, pos + run.count * g.clusterSize);
      continue;
    }
    const e = src.entryNow?.(cluster) ?? (await src.entry(cluster));
    const clusterEnd = Math.min(end, (cluster + 1) * g.clusterSize);
    while (pos < clusterEnd) {
      const sub = Math.floor((pos - cluster * g.clusterSize) / g.subclusterSize);
      const status = subclusterStatus(e, sub);
      const next = Math.min(clusterEnd, cluster * g.clusterSize + (sub + 1) * g.subclusterSize);
      if (status !== runStatus) {
        if (runStatus >= 0 && !(await fn(runStart, pos - runStart, runStatus))) return;
        runStart = pos;
        runStatus = status;
      }
      pos = next;
    }
  }
  if (runStatus >= 0) await fn(runStart, end - runStart, runStatus);
}

/**
 * Ask the backing device about [pos, pos+n) through `query`, clipped to the range; a device that
 * answers nothing (or nothing useful) gets `fallback` for the rest, so the loop always ends.
 */
async function fromBacking<T extends { length: number }>(pos: number, n: number, query: (p: number, len: number) => Promise<T[]>, push: (len: number, x: T | null) => void): Promise<void> {
  let p = pos;
  while (p < pos + n) {
    const before = p;
    for (const x of await query(p, pos + n - p)) {
      const len = Math.min(x.length, pos + n - p);
      if (len <= 0) break;
      push(len, x);
      p += len;
    }
    if (p === before) {
      push(pos + n - p, null);
      break;
    }
  }
}

export async function collectExtents(src: StatusSource, offset: number, length: number, one: boolean): Promise<Extent[]> {
  const out: Extent[] = [];
  const push = (len: number, flags: number): void => {
    const lastE = out[out.length - 1];
    if (lastE && lastE.flags === flags) out[out.length - 1] = { length: lastE.length + len, flags };
    else out.push({ length: len, flags });
  };
  await walkStatus(src, offset, length, async (pos, n, status) => {
    if (status === SUB_DATA || status === SUB_COMPRESSED) push(n, 0);
    else if (status === SUB_ZERO) push(n, EXTENT_HOLE | EXTENT_ZERO);
    else {
      const b = src.backing;
      // "If there is no backing file or the backing file is smaller than the image, they shall
      // read zeros for all parts that are not covered by the backing file."
      const have = b === null ? 0 : Math.max(0, Math.min(n, b.sizeBytes - pos));
      if (have > 0) {
        if (b!.extents) await fromBacking(pos, have, (p, len) => b!.extents!(p, len), (len, x) => push(len, x ? x.flags : 0));
        else push(have, 0);
      }
      if (have < n) push(n - have, EXTENT_HOLE | EXTENT_ZERO);
    }
    return !(one && out.length > 1);
  });
  if (one && out.length > 1) out.length = 1;
  return out;
}

export async function collectAllocationDepth(src: StatusSource, offset: number, length: number): Promise<DepthExtent[]> {
  const out: DepthExtent[] = [];
  const push = (len: number, depth: number): void => {
    const lastE = out[out.length - 1];
    if (lastE && lastE.depth === depth) out[out.length - 1] = { length: lastE.length + len, depth };
    else out.push({ length: len, depth });
  };
  await walkStatus(src, offset, length, async (pos, n, status) => {
    // Zero clusters are allocated in this image: reads do not reach the backing file.
    if (status !== SUB_UNALLOCATED) {
      push(n, 1);
      return true;
    }
    const b = src.backing;
    const have = b === null ? 0 : Math.max(0, Math.min(n, b.sizeBytes - pos));
    if (have > 0) {
      if (b!.allocationDepth) await fromBacking(pos, have, (p, len) => b!.allocationDepth!(p, len), (len, x) => push(len, x === null ? 2 : x.depth === 0 ? 0 : x.depth + 1));
      else push(have, 2);
    }
    if (have < n) push(n - have, 0);
    return true;
  });
  return out;
}
