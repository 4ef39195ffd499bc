// Internal snapshot create, delete and apply (qcow2.txt, "Snapshots"), in QEMU's order:
// refcounts are raised before anything new refers to them and lowered only after nothing does,
// a new snapshot table is written and flushed before the header switches to it, and COPIED
// flags of the active tables are recomputed from the refcounts afterwards.

import type { HostFile } from '../../io/host-file.js';
import { writeU64 } from '../../util/u64.js';
import type { TableCache } from './l2-cache.js';
import { decodeL1Entry, decodeL2Entry, encodeL1Entry, type Qcow2Geometry } from './map.js';
import type { ImageState, RefcountManager } from './refcount.js';
import type { Qcow2Snapshot } from './snapshot.js';

/** Encode a snapshot table (entries padded to 8 bytes). */
export function encodeSnapshotTable(snapshots: readonly Qcow2Snapshot[]): Buffer {
  const parts: Buffer[] = [];
  for (const s of snapshots) {
    const id = Buffer.from(s.id, 'utf8');
    const name = Buffer.from(s.name, 'utf8');
    const len = Math.ceil((40 + s.extraData.length + id.length + name.length) / 8) * 8;
    const e = Buffer.alloc(len);
    writeU64(e, s.l1TableOffset, 0);
    e.writeUInt32BE(s.l1Size, 8);
    e.writeUInt16BE(id.length, 12);
    e.writeUInt16BE(name.length, 14);
    e.writeUInt32BE(s.dateSec, 16);
    e.writeUInt32BE(s.dateNsec, 20);
    e.writeBigUInt64BE(s.vmClockNsec, 24);
    e.writeUInt32BE(Math.min(s.vmStateSize, 0xffffffff), 32);
    e.writeUInt32BE(s.extraData.length, 36);
    s.extraData.copy(e, 40);
    id.copy(e, 40 + s.extraData.length);
    name.copy(e, 40 + s.extraData.length + id.length);
    parts.push(e);
  }
  return Buffer.concat(parts);
}

/** Extra data as QEMU writes it: vm_state_size (u64), disk_size (u64), icount (-1: none). */
export function snapshotExtraData(diskSizeBytes: number): Buffer {
  const b = Buffer.alloc(24);
  writeU64(b, diskSizeBytes, 8);
  b.writeBigInt64BE(-1n, 16);
  return b;
}

export interface SnapshotTarget {
  readonly file: HostFile;
  readonly geometry: Qcow2Geometry;
  readonly refcounts: RefcountManager;
  readonly l2Cache: TableCache;
  readonly state: ImageState;
}

/** Add `delta` to the refcount of every L2 table and data cluster reachable from `l2Offsets`. */
export async function adjustTreeRefcounts(t: SnapshotTarget, l2Offsets: readonly number[], delta: number): Promise<void> {
  const g = t.geometry;
  const cs = g.clusterSize;
  for (const l2 of l2Offsets) {
    if (l2 === 0) continue;
    const table = await t.l2Cache.get(l2);
    for (let j = 0; j < g.l2Entries; j++) {
      const e = decodeL2Entry(g, table, j, t.state.fileEnd);
      if (e.compressed) {
        const start = Math.floor(e.compressedOffset / 512) * 512;
        const bytes = e.compressedBytes + (e.compressedOffset % 512);
        if (delta > 0) await t.refcounts.retain(start, bytes);
        else await t.refcounts.release(start, bytes);
      } else if (e.hasHost) {
        await t.refcounts.add(e.hostOffset / cs, delta);
      }
    }
    await t.refcounts.add(l2 / cs, delta);
  }
}

/**
 * Recompute COPIED (bit 63) in the active L1 table and the L2 tables it reaches: set exactly
 * when the refcount is one. Returns whether the L1 table changed (the caller writes it).
 */
export async function refreshCopiedFlags(t: SnapshotTarget, l1: Buffer, l2Offsets: readonly number[]): Promise<boolean> {
  const g = t.geometry;
  const cs = g.clusterSize;
  let l1Changed = false;
  for (let i = 0; i < l2Offsets.length; i++) {
    const l2 = l2Offsets[i]!;
    if (l2 === 0) continue;
    const want = (await t.refcounts.get(l2 / cs)) === 1;
    if (decodeL1Entry(l1, i).copied !== want) {
      encodeL1Entry(l1, i, l2, want);
      l1Changed = true;
    }
    const table = await t.l2Cache.get(l2);
    let lo = Infinity;
    let hi = 0;
    for (let j = 0; j < g.l2Entries; j++) {
      const e = decodeL2Entry(g, table, j, t.state.fileEnd);
      let wantCopied: boolean;
      if (e.compressed) wantCopied = false;
      else if (e.hasHost) wantCopied = (await t.refcounts.get(e.hostOffset / cs)) === 1;
      else continue;
      if (e.copied === wantCopied) continue;
      const pos = j * g.l2EntryBytes;
      const w = table.readUInt32BE(pos);
      table.writeUInt32BE((wantCopied ? w | 0x80000000 : w & 0x7fffffff) >>> 0, pos);
      lo = Math.min(lo, pos);
      hi = Math.max(hi, pos + 4);
    }
    if (hi > 0) await t.l2Cache.write(l2, table, { start: lo, end: hi });
  }
  return l1Changed;
}
