// Host cluster reference counts (qcow2.txt, "Host cluster management"): the refcount table and
// refcount blocks of any width (1 to 64 bits), allocation of free host clusters, and growth of
// the refcount table. Callers hold the image's metadata lock around every mutating call.
//
// Crash safety: a new refcount block is written before the table entry that points at it; a
// grown refcount table is written and flushed before the header switches to it; the old table
// is freed only afterwards. A crash at any point leaks clusters at worst. In write-back mode the
// blocks' changes stay cached until writeDirty(); both structural changes above first write
// every dirty block, so nothing on disk ever points at a cluster whose refcount is not there.

import { CorruptImageError, RequestError } from '../../errors.js';
import type { HostFile } from '../../io/host-file.js';
import { readU64OrNull, writeU64 } from '../../util/u64.js';
import { QCOW2_HDR, QCOW2_MAX_REFTABLE_BYTES } from './header.js';
import { TableCache } from './l2-cache.js';
import type { Qcow2Geometry } from './map.js';

/** Image-wide mutable facts shared by the metadata modules. */
export interface ImageState {
  /** Bytes: one past the last host byte that is allocated or written. */
  fileEnd: number;
}

export function readRefcountEntry(block: Buffer, index: number, order: number): number {
  switch (order) {
    case 3:
      return block[index]!;
    case 4:
      return block.readUInt16BE(index * 2);
    case 5:
      return block.readUInt32BE(index * 4);
    case 6: {
      const v = readU64OrNull(block, index * 8);
      if (v === null) throw new CorruptImageError(`qcow2: refcount ${block.readBigUInt64BE(index * 8)} is out of range`);
      return v;
    }
    default: {
      const bits = 1 << order;
      const bitPos = index * bits;
      return (block[bitPos >> 3]! >> (bitPos & 7)) & ((1 << bits) - 1);
    }
  }
}

/** Write entry `index`; returns the byte range of the block that changed. */
export function writeRefcountEntry(block: Buffer, index: number, order: number, value: number): { start: number; end: number } {
  switch (order) {
    case 3:
      block[index] = value;
      return { start: index, end: index + 1 };
    case 4:
      block.writeUInt16BE(value, index * 2);
      return { start: index * 2, end: index * 2 + 2 };
    case 5:
      block.writeUInt32BE(value, index * 4);
      return { start: index * 4, end: index * 4 + 4 };
    case 6:
      writeU64(block, value, index * 8);
      return { start: index * 8, end: index * 8 + 8 };
    default: {
      // "If refcount_bits implies a sub-byte width, bit 0 means the least significant bit."
      const bits = 1 << order;
      const bitPos = index * bits;
      const mask = ((1 << bits) - 1) << (bitPos & 7);
      const byte = bitPos >> 3;
      block[byte] = (block[byte]! & ~mask) | ((value << (bitPos & 7)) & mask);
      return { start: byte, end: byte + 1 };
    }
  }
}

export interface RefcountOptions {
  readonly file: HostFile;
  readonly geometry: Qcow2Geometry;
  readonly refcountOrder: number;
  readonly reftableOffset: number;
  readonly reftableClusters: number;
  readonly reftable: number[];
  readonly state: ImageState;
  readonly cacheTables: number;
  /** Fixed metadata ranges (header, L1) that no refcount block may overlap. */
  readonly fixedRanges: () => readonly { what: string; start: number; end: number }[];
}

/** Unused refcount table entries, compared 64 at a time. */
const UNUSED_RUN = 64;
const UNUSED_RUN_BYTES = Buffer.alloc(UNUSED_RUN * 8);

/** Decode and validate a refcount table read from disk. */
export function decodeReftable(buf: Buffer, clusterSize: number, fileSize: number, fixed: readonly { what: string; start: number; end: number }[]): number[] {
  const out = new Array<number>(buf.length / 8).fill(0);
  for (let i = 0; i < out.length; i++) {
    // Most of a table is unused: unused stretches are skipped a compare at a time, not decoded.
    if (i % UNUSED_RUN === 0 && i + UNUSED_RUN <= out.length && UNUSED_RUN_BYTES.equals(buf.subarray(i * 8, (i + UNUSED_RUN) * 8))) {
      i += UNUSED_RUN - 1;
      continue;
    }
    const v = readU64OrNull(buf, i * 8);
    if (v === null) throw new CorruptImageError(`qcow2: refcount table entry ${i} is out of range`);
    if (v !== 0) {
      if (v % clusterSize !== 0) throw new CorruptImageError(`qcow2: refcount block ${i} at ${v} is not cluster aligned`);
      if (v + clusterSize > fileSize) throw new CorruptImageError(`qcow2: refcount block ${i} at ${v} is past end of file`);
      for (const r of fixed) {
        if (v < r.end && r.start < v + clusterSize) throw new CorruptImageError(`qcow2: refcount block ${i} at ${v} overlaps the ${r.what}`);
      }
    }
    out[i] = v;
  }
  return out;
}

export class RefcountManager {
  readonly order: number;
  readonly maxRefcount: number;
  /** Refcount entries per block. */
  readonly blockEntries: number;
  reftableOffset: number;
  reftableClusters: number;
  readonly reftable: number[];
  private readonly cache: TableCache;
  private freeHint = 0;
  /** Told about every cluster whose refcount drops to zero (it may be reused from then on). */
  onFree: ((clusterIndex: number) => void) | null = null;
  /** Extra clusters to treat as in use (used while rebuilding refcounts). */
  reserved: ((clusterIndex: number) => boolean) | null = null;

  constructor(private readonly o: RefcountOptions) {
    this.order = o.refcountOrder;
    this.maxRefcount = o.refcountOrder === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << o.refcountOrder) - 1;
    this.blockEntries = (o.geometry.clusterSize * 8) >> o.refcountOrder;
    this.reftableOffset = o.reftableOffset;
    this.reftableClusters = o.reftableClusters;
    this.reftable = o.reftable;
    this.cache = new TableCache(
      o.cacheTables,
      async (off) => {
        const b = Buffer.allocUnsafe(o.geometry.clusterSize);
        await o.file.pread(b, off);
        return b;
      },
      (off, buf) => o.file.pwrite(buf, off),
    );
  }

  /** Keep refcount changes in memory until writeDirty() (the driver orders the writeback). */
  set writeBack(on: boolean) {
    this.cache.writeBack = on;
  }

  /** Refcount blocks changed in memory and not yet written. */
  dirtyCount(): number {
    return this.cache.dirtyCount();
  }

  get cacheCapacity(): number {
    return this.cache.capacity;
  }

  /** Write every changed refcount block (not flushed). */
  writeDirty(): Promise<void> {
    return this.cache.writeDirty();
  }

  private get cs(): number {
    return this.o.geometry.clusterSize;
  }

  async get(clusterIndex: number): Promise<number> {
    const ti = Math.floor(clusterIndex / this.blockEntries);
    const off = ti < this.reftable.length ? this.reftable[ti]! : 0;
    if (off === 0) return 0;
    const block = await this.cache.get(off);
    return readRefcountEntry(block, clusterIndex % this.blockEntries, this.order);
  }

  /** Set a refcount, allocating a refcount block (and growing the table) when needed. */
  async set(clusterIndex: number, value: number): Promise<void> {
    if (value > this.maxRefcount) throw new RequestError('EINVAL', `qcow2: refcount ${value} overflows ${1 << this.order}-bit refcounts`);
    const ti = Math.floor(clusterIndex / this.blockEntries);
    if (value === 0 && (ti >= this.reftable.length || this.reftable[ti] === 0)) return;
    await this.ensureBlock(ti);
    const off = this.reftable[ti]!;
    const block = await this.cache.get(off);
    const range = writeRefcountEntry(block, clusterIndex % this.blockEntries, this.order, value);
    await this.cache.write(off, block, range);
    if (value === 0) {
      if (clusterIndex < this.freeHint) this.freeHint = clusterIndex;
      this.onFree?.(clusterIndex);
    }
  }

  /**
   * Set the refcounts of clusters [first, first + n) to `value` (not 0), a refcount block at a
   * time: one change to each block (one write of it, when not in write-back mode) instead of
   * one per cluster.
   */
  private async setRun(first: number, n: number, value: number): Promise<void> {
    if (value > this.maxRefcount) throw new RequestError('EINVAL', `qcow2: refcount ${value} overflows ${1 << this.order}-bit refcounts`);
    for (let c = first; c < first + n; ) {
      const ti = Math.floor(c / this.blockEntries);
      const stop = Math.min(first + n, (ti + 1) * this.blockEntries);
      await this.ensureBlock(ti);
      const off = this.reftable[ti]!;
      const block = await this.cache.get(off);
      let start = block.length;
      let end = 0;
      for (; c < stop; c++) {
        const r = writeRefcountEntry(block, c % this.blockEntries, this.order, value);
        start = Math.min(start, r.start);
        end = Math.max(end, r.end);
      }
      await this.cache.write(off, block, { start, end });
    }
  }

  async add(clusterIndex: number, delta: number): Promise<number> {
    const cur = await this.get(clusterIndex);
    const next = cur + delta;
    if (next < 0) throw new CorruptImageError(`qcow2: refcount of host cluster ${clusterIndex} would drop below zero`);
    await this.set(clusterIndex, next);
    return next;
  }

  /** Decrement the refcount of every cluster overlapping [offset, offset+bytes). */
  async release(offset: number, bytes: number): Promise<void> {
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + bytes - 1) / this.cs);
    for (let c = first; c <= last; c++) await this.add(c, -1);
  }

  /** Increment the refcount of every cluster overlapping [offset, offset+bytes). */
  async retain(offset: number, bytes: number): Promise<void> {
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + bytes - 1) / this.cs);
    for (let c = first; c <= last; c++) await this.add(c, 1);
  }

  private isFree(block: Buffer | null, clusterIndex: number): boolean {
    if (this.reserved?.(clusterIndex)) return false;
    return block === null || readRefcountEntry(block, clusterIndex % this.blockEntries, this.order) === 0;
  }

  /** First run of `n` free clusters at or after the free hint (no refcount changed). */
  async findFree(n: number): Promise<number> {
    let start = this.freeHint;
    let run = 0;
    let c = this.freeHint;
    // Everything between the hint and the first free cluster seen is in use: skip it next time.
    let firstFree = -1;
    for (;;) {
      const ti = Math.floor(c / this.blockEntries);
      const off = ti < this.reftable.length ? this.reftable[ti]! : 0;
      const block = off === 0 ? null : await this.cache.get(off);
      const end = (ti + 1) * this.blockEntries;
      for (; c < end; c++) {
        if (this.isFree(block, c)) {
          if (firstFree < 0) firstFree = c;
          if (run === 0) start = c;
          if (++run === n) {
            if (this.reserved === null) this.freeHint = Math.max(this.freeHint, firstFree);
            return start;
          }
        } else {
          run = 0;
        }
      }
    }
  }

  /** Allocate `n` contiguous clusters with refcount 1 (written, not flushed); returns the byte offset. */
  async allocate(n: number): Promise<number> {
    for (;;) {
      const start = await this.findFree(n);
      const firstTi = Math.floor(start / this.blockEntries);
      const lastTi = Math.floor((start + n - 1) / this.blockEntries);
      let changed = false;
      for (let ti = firstTi; ti <= lastTi; ti++) {
        if (ti >= this.reftable.length || this.reftable[ti] === 0) {
          await this.ensureBlock(ti);
          changed = true;
        }
      }
      if (changed && (await this.findFree(n)) !== start) continue;
      await this.setRun(start, n, 1);
      if (start === this.freeHint) this.freeHint = start + n;
      this.o.state.fileEnd = Math.max(this.o.state.fileEnd, (start + n) * this.cs);
      return start * this.cs;
    }
  }

  /** Make sure refcount block `ti` exists. */
  private async ensureBlock(ti: number): Promise<void> {
    if (ti < this.reftable.length && this.reftable[ti] !== 0) return;
    if (ti >= this.reftable.length) {
      await this.growTable(ti + 1);
      // The grown table's own clusters may fall in block `ti`, which growTable then created:
      // replacing it would drop the refcounts of the table itself.
      if (this.reftable[ti] !== 0) return;
    }
    for (;;) {
      const c = await this.findFree(1);
      const cti = Math.floor(c / this.blockEntries);
      const block = Buffer.alloc(this.cs);
      if (cti === ti) {
        // The block describes itself, like QEMU places new blocks in the range they cover.
        writeRefcountEntry(block, c % this.blockEntries, this.order, 1);
      } else {
        await this.ensureBlock(cti);
        // Growing the table for block `cti` may have created block `ti` too.
        if (this.reftable[ti] !== 0) return;
        if (!(await this.isFreeNow(c))) continue;
        await this.set(c, 1);
      }
      const off = c * this.cs;
      await this.o.file.pwrite(block, off);
      this.o.state.fileEnd = Math.max(this.o.state.fileEnd, off + this.cs);
      await this.cache.write(off, block, { start: 0, end: 0 });
      // The block, and its own refcount when another block holds it, must be on disk before
      // the table entry that makes it count.
      await this.cache.writeDirty();
      await this.o.file.datasync();
      const entry = Buffer.alloc(8);
      writeU64(entry, off, 0);
      await this.o.file.pwrite(entry, this.reftableOffset + ti * 8);
      this.reftable[ti] = off;
      return;
    }
  }

  private async isFreeNow(c: number): Promise<boolean> {
    return !this.reserved?.(c) && (await this.get(c)) === 0;
  }

  /**
   * Move the refcount table to a larger copy at the end of the file. The new table and the
   * refcount blocks describing it are written and flushed before the header points at them.
   */
  private async growTable(minEntries: number): Promise<void> {
    const cs = this.cs;
    const entriesPerCluster = cs / 8;
    const wanted = Math.max(minEntries, Math.ceil(this.reftable.length * 1.5));
    const tableClusters = Math.ceil(wanted / entriesPerCluster);
    if (tableClusters * cs > QCOW2_MAX_REFTABLE_BYTES) throw new RequestError('ENOSPC', 'qcow2: refcount table would exceed its size limit');
    const entries = tableClusters * entriesPerCluster;
    const start = Math.ceil(this.o.state.fileEnd / cs);
    const newTable = this.reftable.slice();
    while (newTable.length < entries) newTable.push(0);
    // Blocks for the area [start, start + tableClusters + k) that no existing block covers.
    let newBlocks: number[] = [];
    for (;;) {
      const areaEnd = start + tableClusters + newBlocks.length;
      const needed: number[] = [];
      for (let ti = Math.floor(start / this.blockEntries); ti <= Math.floor((areaEnd - 1) / this.blockEntries); ti++) {
        if (ti >= entries) throw new RequestError('ENOSPC', 'qcow2: refcount table growth does not converge');
        if (newTable[ti] === 0) needed.push(ti);
      }
      if (needed.length === newBlocks.length) {
        newBlocks = needed;
        break;
      }
      newBlocks = needed;
    }
    const areaEnd = start + tableClusters + newBlocks.length;
    const blockBufs = new Map<number, Buffer>();
    newBlocks.forEach((ti, i) => {
      newTable[ti] = (start + tableClusters + i) * cs;
      blockBufs.set(ti, Buffer.alloc(cs));
    });
    for (let c = start; c < areaEnd; c++) {
      const ti = Math.floor(c / this.blockEntries);
      const buf = blockBufs.get(ti);
      if (buf) writeRefcountEntry(buf, c % this.blockEntries, this.order, 1);
      else await this.set(c, 1);
    }
    for (const [ti, buf] of blockBufs) {
      await this.o.file.pwrite(buf, newTable[ti]!);
      await this.cache.write(newTable[ti]!, buf, { start: 0, end: 0 });
    }
    const tableBuf = Buffer.alloc(tableClusters * cs);
    newTable.forEach((v, i) => writeU64(tableBuf, v, i * 8));
    await this.o.file.pwrite(tableBuf, start * cs);
    this.o.state.fileEnd = Math.max(this.o.state.fileEnd, areaEnd * cs);
    await this.cache.writeDirty();
    await this.o.file.datasync();
    const hdr = Buffer.alloc(12);
    writeU64(hdr, start * cs, 0);
    hdr.writeUInt32BE(tableClusters, 8);
    await this.o.file.pwrite(hdr, QCOW2_HDR.REFCOUNT_TABLE_OFFSET);
    await this.o.file.datasync();
    const oldOffset = this.reftableOffset;
    const oldClusters = this.reftableClusters;
    this.reftable.length = 0;
    this.reftable.push(...newTable);
    this.reftableOffset = start * cs;
    this.reftableClusters = tableClusters;
    await this.release(oldOffset, oldClusters * cs);
  }
}
