// Refcount consistency (QEMU's qcow2-refcount.c check): recount every reference from the
// metadata (header, L1/L2 tables, data and compressed clusters, refcount structures, snapshot
// table and snapshot L1 tables, bitmaps while their extension is valid) and compare with the
// stored refcounts. Stored > counted is a leak, stored < counted is a corruption.

import { CorruptImageError, UnsupportedImageError } from '../../errors.js';
import type { HostFile } from '../../io/host-file.js';
import { readU64OrNull } from '../../util/u64.js';
import { QCOW2_AUTOCLEAR, type Qcow2Header } from './header.js';
import type { TableCache } from './l2-cache.js';
import { decodeL1Entry, decodeL2Entry, encodeL1Entry, type Qcow2Geometry } from './map.js';
import type { ImageState, RefcountManager } from './refcount.js';
import type { Qcow2Snapshot } from './snapshot.js';

export type CheckMode = 'none' | 'leaks' | 'all';

export interface CheckTarget {
  readonly file: HostFile;
  readonly header: Qcow2Header;
  readonly geometry: Qcow2Geometry;
  readonly l1TableOffset: number;
  readonly l1Offsets: readonly number[];
  /** The active L1 table as in memory (raw entries), and the L2 table cache, for COPIED repairs. */
  readonly l1: Buffer;
  readonly l2Cache: TableCache;
  readonly snapshots: readonly Qcow2Snapshot[];
  readonly snapshotsOffset: number;
  readonly snapshotTableBytes: number;
  readonly refcounts: RefcountManager;
  readonly state: ImageState;
  readonly sizeBytes: number;
}

export interface CheckResult {
  /** References stored lower than counted (or unreadable metadata) left after any repair. */
  readonly corruptions: number;
  /** Clusters stored with a higher refcount than counted, left after any repair. */
  readonly leaks: number;
  readonly corruptionsFixed: number;
  readonly leaksFixed: number;
  /** One line per problem found, for `check` output. */
  readonly messages: readonly string[];
  /** One past the highest host byte in use. */
  readonly imageEndOffset: number;
  /** Guest clusters of the virtual disk, and those the active state allocates. */
  readonly totalClusters: number;
  readonly allocatedClusters: number;
  readonly fragmentedClusters: number;
  readonly compressedClusters: number;
}

interface Count {
  counts: Uint32Array;
  errors: number;
  messages: string[];
  /** Fragmentation statistics of the active L1 table, as qemu-img check reports them. */
  allocated: number;
  fragmented: number;
  compressed: number;
}

async function countReferences(t: CheckTarget, fileSize: number): Promise<Count> {
  const g = t.geometry;
  const cs = g.clusterSize;
  const n = Math.ceil(Math.max(fileSize, t.state.fileEnd) / cs);
  // One counter per host cluster; refuse rather than exhaust memory on enormous images.
  if (n > 2 ** 28) throw new UnsupportedImageError(`qcow2: checking ${n} host clusters needs more memory than this build allows`);
  const c: Count = { counts: new Uint32Array(n), errors: 0, messages: [], allocated: 0, fragmented: 0, compressed: 0 };
  const inc = (offset: number, bytes: number, what: string): void => {
    if (bytes <= 0) return;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + bytes - 1) / cs);
    if (last >= n) {
      c.errors++;
      c.messages.push(`ERROR ${what} at ${offset} is beyond the end of the image file`);
      return;
    }
    for (let i = first; i <= last; i++) c.counts[i] = Math.min(0xffffffff, c.counts[i]! + 1);
  };
  inc(0, cs, 'header');
  const table = Buffer.allocUnsafe(cs);
  const walkL1 = async (l1Offset: number, l1Size: number, l1Entries: readonly number[] | null, what: string, stats: boolean): Promise<void> => {
    let nextContiguous = 0;
    inc(l1Offset, l1Size * 8, what);
    let entries = l1Entries;
    if (entries === null) {
      const raw = Buffer.alloc(l1Size * 8);
      await t.file.pread(raw, l1Offset);
      const list: number[] = [];
      for (let i = 0; i < l1Size; i++) {
        try {
          list.push(decodeL1Entry(raw, i).l2Offset);
        } catch (err) {
          c.errors++;
          c.messages.push(`ERROR ${what} entry ${i}: ${(err as Error).message}`);
          list.push(0);
        }
      }
      entries = list;
    }
    for (let i = 0; i < entries.length; i++) {
      const l2 = entries[i]!;
      if (l2 === 0) continue;
      if (l2 % cs !== 0 || l2 + cs > Math.max(fileSize, t.state.fileEnd)) {
        c.errors++;
        c.messages.push(`ERROR L2 table at ${l2} is misaligned or beyond the end of the image file`);
        continue;
      }
      inc(l2, cs, 'L2 table');
      // QEMU measures contiguity within each L2 table.
      nextContiguous = 0;
      await t.file.pread(table, l2);
      for (let j = 0; j < g.l2Entries; j++) {
        try {
          const e = decodeL2Entry(g, table, j, Math.max(fileSize, t.state.fileEnd));
          if (stats && (e.compressed || e.hasHost)) {
            c.allocated++;
            if (e.compressed) {
              // Compressed clusters are fragmented by nature (QEMU's accounting).
              c.compressed++;
              c.fragmented++;
            } else {
              if (nextContiguous !== 0 && e.hostOffset !== nextContiguous) c.fragmented++;
              nextContiguous = e.hostOffset + cs;
            }
          }
          if (e.compressed) inc(Math.floor(e.compressedOffset / 512) * 512, e.compressedBytes + (e.compressedOffset % 512), 'compressed cluster');
          // Clusters in an external data file are not refcounted.
          else if (e.hasHost && !g.externalData) inc(e.hostOffset, cs, 'data cluster');
        } catch (err) {
          c.errors++;
          c.messages.push(`ERROR L2 table at ${l2} entry ${j}: ${(err as Error).message}`);
        }
      }
    }
  };
  await walkL1(t.l1TableOffset, t.l1Offsets.length, t.l1Offsets, 'L1 table', true);
  for (const s of t.snapshots) await walkL1(s.l1TableOffset, s.l1Size, null, `snapshot ${s.id} L1 table`, false);
  if (t.snapshotTableBytes > 0) inc(t.snapshotsOffset, t.snapshotTableBytes, 'snapshot table');
  const rc = t.refcounts;
  inc(rc.reftableOffset, rc.reftableClusters * cs, 'refcount table');
  for (const off of rc.reftable) if (off !== 0) inc(off, cs, 'refcount block');
  const bm = t.header.bitmapsExtension;
  if (bm !== null && (t.header.autoclearFeatures & QCOW2_AUTOCLEAR.BITMAPS) !== 0n) await countBitmaps(t, bm, inc, c);
  return c;
}

async function countBitmaps(t: CheckTarget, ext: Buffer, inc: (o: number, b: number, w: string) => void, c: Count): Promise<void> {
  const cs = t.geometry.clusterSize;
  if (ext.length < 24) return;
  const dirSize = readU64OrNull(ext, 8);
  const dirOffset = readU64OrNull(ext, 16);
  if (dirSize === null || dirOffset === null || dirSize > 64 * 1024 * 1024 || dirOffset % cs !== 0) {
    c.errors++;
    c.messages.push('ERROR bitmap directory is invalid');
    return;
  }
  inc(dirOffset, dirSize, 'bitmap directory');
  const dir = Buffer.alloc(dirSize);
  await t.file.pread(dir, dirOffset);
  for (let pos = 0; pos + 24 <= dir.length; ) {
    const tableOffset = readU64OrNull(dir, pos);
    const tableSize = dir.readUInt32BE(pos + 8);
    const nameSize = dir.readUInt16BE(pos + 18);
    const extraSize = dir.readUInt32BE(pos + 20);
    if (tableOffset === null || tableSize * 8 > 64 * 1024 * 1024) {
      c.errors++;
      c.messages.push('ERROR bitmap table is invalid');
      return;
    }
    inc(tableOffset, tableSize * 8, 'bitmap table');
    const tbl = Buffer.alloc(tableSize * 8);
    await t.file.pread(tbl, tableOffset);
    for (let i = 0; i < tableSize; i++) {
      const hi = tbl.readUInt32BE(i * 8);
      const lo = tbl.readUInt32BE(i * 8 + 4);
      const off = (hi & 0x00ffffff) * 0x1_0000_0000 + ((lo & 0xfffffe00) >>> 0);
      if (off !== 0) inc(off, cs, 'bitmap data');
    }
    pos += Math.ceil((24 + extraSize + nameSize) / 8) * 8;
  }
}

/**
 * Compare stored refcounts with the counted ones; `leaks` lowers leaked refcounts, `all` also
 * raises refcounts that are too low (allocating refcount blocks away from every counted cluster).
 * The caller holds the image's metadata lock and no request is in flight.
 */
export async function checkQcow2(t: CheckTarget, mode: CheckMode): Promise<CheckResult> {
  const rc = t.refcounts;
  const cs = t.geometry.clusterSize;
  let leaksFixed = 0;
  let corruptionsFixed = 0;
  for (let pass = 0; ; pass++) {
    const fileSize = t.file.isBlockDevice ? t.state.fileEnd : await t.file.size();
    const count = await countReferences(t, fileSize);
    let leaks = 0;
    let corruptions = count.errors;
    const messages = count.messages.slice();
    // Past the counted range only clusters inside existing refcount blocks can carry a refcount.
    let lastBlock = -1;
    rc.reftable.forEach((off, ti) => {
      if (off !== 0) lastBlock = ti;
    });
    const total = Math.max(count.counts.length, (lastBlock + 1) * rc.blockEntries);
    const fixes: { index: number; value: number; leak: boolean }[] = [];
    let end = 0;
    for (let i = 0; i < total; i++) {
      if (i >= count.counts.length && i % rc.blockEntries === 0 && rc.reftable[i / rc.blockEntries] === 0) {
        i += rc.blockEntries - 1;
        continue;
      }
      const want = i < count.counts.length ? count.counts[i]! : 0;
      const have = await rc.get(i);
      if (want > 0 || have > 0) end = (i + 1) * cs;
      if (have === want) continue;
      if (have > want) {
        leaks++;
        messages.push(`Leaked cluster ${i} refcount=${have} reference=${want}`);
        if (mode !== 'none') fixes.push({ index: i, value: want, leak: true });
      } else {
        corruptions++;
        messages.push(`ERROR cluster ${i} refcount=${have} reference=${want}`);
        if (mode === 'all') fixes.push({ index: i, value: want, leak: false });
      }
    }
    if (fixes.length === 0 || pass >= 4) {
      // QEMU checks OFLAG_COPIED whatever the refcount comparison found, and counts each
      // mismatch as a corruption: the totals (and so `check`'s JSON) must agree with it.
      const copied = await checkCopiedFlags(t, mode === 'all', messages);
      corruptions += copied.errors;
      corruptionsFixed += copied.fixed;
      return {
        corruptions,
        leaks,
        corruptionsFixed,
        leaksFixed,
        messages,
        imageEndOffset: end,
        totalClusters: Math.ceil(t.sizeBytes / cs),
        allocatedClusters: count.allocated,
        fragmentedClusters: count.fragmented,
        compressedClusters: count.compressed,
      };
    }
    rc.reserved = (i) => i < count.counts.length && count.counts[i]! > 0;
    try {
      for (const f of fixes) {
        await rc.set(f.index, f.value);
        if (f.leak) leaksFixed++;
        else corruptionsFixed++;
      }
    } catch (err) {
      throw new CorruptImageError(`qcow2: refcount repair failed: ${(err as Error).message}`, { cause: err });
    } finally {
      rc.reserved = null;
    }
    await t.file.datasync();
  }
}

/**
 * "bit 63: 1 for an L2 table / standard cluster whose refcount is exactly one" must hold in the
 * active tables; QEMU's check counts a mismatch as corruption and `-r all` rewrites the flag.
 */
async function checkCopiedFlags(t: CheckTarget, fix: boolean, messages: string[]): Promise<{ errors: number; fixed: number }> {
  const g = t.geometry;
  const cs = g.clusterSize;
  let errors = 0;
  let fixed = 0;
  for (let i = 0; i < t.l1Offsets.length; i++) {
    const l2 = t.l1Offsets[i]!;
    if (l2 === 0) continue;
    const rc = await t.refcounts.get(l2 / cs);
    if (decodeL1Entry(t.l1, i).copied !== (rc === 1)) {
      messages.push(`ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l2_offset=${l2} refcount=${rc}`);
      if (fix) {
        encodeL1Entry(t.l1, i, l2, rc === 1);
        await t.file.pwrite(t.l1.subarray(i * 8, i * 8 + 8), t.l1TableOffset + i * 8);
        fixed++;
      } else errors++;
    }
    let table: Buffer;
    try {
      table = await t.l2Cache.get(l2);
    } catch {
      continue;
    }
    for (let j = 0; j < g.l2Entries; j++) {
      let e;
      try {
        e = decodeL2Entry(g, table, j, Math.max(t.state.fileEnd, cs));
      } catch {
        continue;
      }
      let want: boolean;
      if (e.compressed) want = false;
      else if (!e.hasHost) continue;
      else if (g.externalData) want = true;
      else want = (await t.refcounts.get(Math.floor(e.hostOffset / cs))) === 1;
      if (e.copied === want) continue;
      messages.push(`ERROR OFLAG_COPIED data cluster: l2_entry=${j} of L2 table ${l2} copied=${e.copied}`);
      if (fix) {
        const pos = j * g.l2EntryBytes;
        const hi = table.readUInt32BE(pos);
        table.writeUInt32BE((want ? hi | 0x80000000 : hi & 0x7fffffff) >>> 0, pos);
        await t.l2Cache.write(l2, table, { start: pos, end: pos + 4 });
        fixed++;
      } else errors++;
    }
  }
  return { errors, fixed };
}
