// Deciding what a write, write-zeroes or discard does to one guest cluster (qcow2.txt, "Cluster
// mapping", "Extended L2 Entries"): write in place or allocate a new host cluster, which bytes
// must be copied (COW) from the current content (backing file, zeros, compressed or shared
// cluster), and which L2 entry to install. Pure functions; the driver performs the I/O in crash-
// safe order. Also the byte-granular allocator that packs compressed clusters like QEMU.

import { ALL_SUBCLUSTERS, subclusterMask, type L2Entry, type Qcow2Geometry } from './map.js';
import type { RefcountManager } from './refcount.js';

/** A normal L2 entry to install. */
export interface EntryUpdate {
  readonly hostOffset: number;
  readonly copied: boolean;
  readonly alloc: number;
  readonly zero: number;
}

/** One guest cluster touched by a write. */
export interface ClusterPlan {
  readonly cluster: number;
  /** Byte range inside the cluster the caller's data covers. */
  readonly a: number;
  readonly b: number;
  readonly old: L2Entry;
  /** Byte range inside the cluster written to the host; outside [a, b) it is copied (COW). */
  readonly spanStart: number;
  readonly spanEnd: number;
  readonly newAlloc: number;
  readonly newZero: number;
  /** Needs a fresh host cluster (the old one, if any, is released afterwards). */
  readonly allocate: boolean;
  /** Host cluster to write to: the old one, or filled in once allocated. */
  hostOffset: number;
  /** The L2 entry changes once the data is written. */
  readonly updateEntry: boolean;
}

/** Subclusters overlapping bytes [a, b) of a cluster. */
export function touchedSubclusters(g: Qcow2Geometry, a: number, b: number): number {
  return subclusterMask(Math.floor(a / g.subclusterSize), Math.floor((b - 1) / g.subclusterSize));
}

/** Plan writing bytes [a, b) of guest cluster `cluster`, whose entry is `old`. */
export function planWrite(g: Qcow2Geometry, cluster: number, a: number, b: number, old: L2Entry): ClusterPlan {
  const cs = g.clusterSize;
  const sub = g.subclusterSize;
  const touched = touchedSubclusters(g, a, b);
  // A cluster we own alone (refcount 1, or any cluster of an external data file) is written in place.
  if (old.hasHost && (old.copied || g.externalData)) {
    if ((old.alloc & touched) >>> 0 === touched) {
      return { cluster, a, b, old, spanStart: a, spanEnd: b, newAlloc: old.alloc, newZero: old.zero, allocate: false, hostOffset: old.hostOffset, updateEntry: false };
    }
    // Unallocated subclusters, or a preallocated zero cluster, get data: pad to subclusters.
    return {
      cluster, a, b, old,
      spanStart: Math.floor(a / sub) * sub,
      spanEnd: Math.ceil(b / sub) * sub,
      newAlloc: (old.alloc | touched) >>> 0,
      newZero: (old.zero & ~touched) >>> 0,
      allocate: false,
      hostOffset: old.hostOffset,
      updateEntry: true,
    };
  }
  // Unallocated, zero, compressed or shared: a new cluster takes over everything still in use.
  let newAlloc: number;
  if (!g.extL2) newAlloc = 1;
  else if (old.compressed) newAlloc = ALL_SUBCLUSTERS;
  else if (old.hasHost) newAlloc = (old.alloc | touched) >>> 0;
  else newAlloc = touched;
  let spanStart = 0;
  let spanEnd = cs;
  if (g.extL2) {
    const firstSub = 31 - Math.clz32(newAlloc & -newAlloc);
    const lastSub = 31 - Math.clz32(newAlloc);
    spanStart = Math.min(a, firstSub * sub);
    spanEnd = Math.max(b, Math.min(cs, (lastSub + 1) * sub));
  }
  return { cluster, a, b, old, spanStart, spanEnd, newAlloc, newZero: (old.zero & ~newAlloc) >>> 0, allocate: true, hostOffset: 0, updateEntry: true };
}

export type ZeroDecision =
  | { readonly kind: 'skip' }
  | { readonly kind: 'update'; readonly entry: EntryUpdate; readonly releaseOld: boolean }
  /** Only writing zeros (through the write path, with COW) can do it. */
  | { readonly kind: 'write' };

/**
 * Zero the subclusters `mask` (whole ones) of a cluster whose entry is `e`. `mayTrim` false
 * (NBD_CMD_FLAG_NO_HOLE) keeps a cluster we own allocated, as QEMU's zero-alloc clusters.
 */
export function planZero(g: Qcow2Geometry, e: L2Entry, mask: number, mayTrim: boolean, hasBacking: boolean): ZeroDecision {
  const whole = mask === (g.extL2 ? ALL_SUBCLUSTERS : 1);
  const keepHost = e.hasHost && (e.copied || g.externalData);
  if (!g.zeroFlag && !g.extL2) {
    // Version 2 has no zero flag: deallocate when that reads as zeros, else write zeros.
    if (!hasBacking && !e.compressed && !e.hasHost) return { kind: 'skip' };
    if (!hasBacking && whole && mayTrim) return { kind: 'update', entry: { hostOffset: 0, copied: false, alloc: 0, zero: 0 }, releaseOld: true };
    return { kind: 'write' };
  }
  const allZero = g.extL2 ? ALL_SUBCLUSTERS : 1;
  if (whole) {
    if (keepHost && !mayTrim) return { kind: 'update', entry: { hostOffset: e.hostOffset, copied: true, alloc: 0, zero: allZero }, releaseOld: false };
    return { kind: 'update', entry: { hostOffset: 0, copied: false, alloc: 0, zero: allZero }, releaseOld: true };
  }
  if (keepHost || (!e.compressed && !e.hasHost)) {
    return { kind: 'update', entry: { hostOffset: e.hostOffset, copied: keepHost, alloc: (e.alloc & ~mask) >>> 0, zero: (e.zero | mask) >>> 0 }, releaseOld: false };
  }
  return { kind: 'write' };
}

/**
 * Discard a whole cluster, as QEMU does without full_discard: it reads as zeros afterwards
 * (zero flag) when it was allocated or a backing file would show through; null: nothing to do.
 */
export function planTrim(g: Qcow2Geometry, e: L2Entry, hasBacking: boolean): EntryUpdate | null {
  const allocated = e.compressed || e.hasHost;
  let zero = 0;
  if (hasBacking || allocated) zero = g.extL2 ? ALL_SUBCLUSTERS : g.zeroFlag ? 1 : 0;
  if (!allocated && e.zero === zero) return null;
  return { hostOffset: 0, copied: false, alloc: 0, zero };
}

/**
 * Byte-granular space for compressed clusters (QEMU's free_byte_offset): a new compressed
 * cluster goes right after the previous one while it fits in that host cluster, which then
 * takes one more reference; otherwise fresh clusters are allocated. Metadata lock held.
 */
export class CompressedAllocator {
  private next = 0;

  constructor(
    private readonly refcounts: RefcountManager,
    private readonly clusterSize: number,
    private readonly afterAllocate: () => Promise<void>,
  ) {}

  async allocate(size: number): Promise<number> {
    const cs = this.clusterSize;
    const at = this.next;
    if (at !== 0 && at % cs !== 0 && cs - (at % cs) >= size) {
      await this.refcounts.add(Math.floor(at / cs), 1);
      this.next = at + size;
      return at;
    }
    const start = await this.refcounts.allocate(Math.ceil(size / cs));
    await this.afterAllocate();
    this.next = start + size;
    return start;
  }

  /** A host cluster was freed: never pack into it again. */
  forget(clusterIndex: number): void {
    if (Math.floor(this.next / this.clusterSize) === clusterIndex) this.next = 0;
  }
}
