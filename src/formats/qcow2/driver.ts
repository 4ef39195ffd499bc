// The qcow2 BlockDevice (qcow2.txt as a whole): open and validate, reads through the L1/L2 map
// (data, zero and compressed clusters, unallocated ranges from the backing device), writes in
// place with allocation and copy-on-write, trim, write-zeroes, flush and extents.
//
// Metadata is written back, like QEMU's qcow2 caches: an allocation raises the refcount and
// installs the L2 entry (and a new L2 table's L1 entry) in memory only. Nothing of it reaches
// the disk until a FLUSH or FUA write, a cache holding too many dirty tables, a snapshot or
// resize, or close; then writeback() writes in dependency order (a kill -9 at any instant
// leaves at worst leaked clusters, and loses only writes not yet flushed, as NBD allows):
//   data (already written) + refcount blocks -> fdatasync -> L2 tables -> fdatasync -> L1 entries
//   free: the cleared L2 entry (and L1 entry) written and flushed -> refcount lowered; until
//   then the cluster stays in use, so it cannot be reused under an entry still on disk
//   lazy_refcounts: the dirty bit is set and flushed before the first refcount is skipped, and
//   refcounts are rebuilt on the next writable open when it is found set.
// Snapshot operations, resize and check run on written-back, write-through caches.

import { readFromBacking } from '../../block/backing-read.js';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import type { BlockDevice, BlockSizes, Capabilities, DepthExtent, Extent, ExtentsOptions, HostRun, WriteOptions, ZeroOptions } from '../../block/device.js';
import { CorruptImageError, RequestError, UnsupportedImageError, UsageError } from '../../errors.js';
import { HostFile } from '../../io/host-file.js';
import { WriteCombiner } from '../../io/write-combiner.js';
import { blockDeviceSize } from '../../sys/libc.js';
import { NowaitReader } from '../../sys/nowait.js';
import { CompressedAllocator, planTrim, planWrite, planZero, touchedSubclusters, type ClusterPlan, type EntryUpdate } from './alloc.js';
import { compressCluster, decompressCluster } from './compress.js';
import { collectAllocationDepth, collectExtents, type StatusSource } from './extents.js';
import { checkQcow2, type CheckMode, type CheckResult, type CheckTarget } from './check.js';
import {
  decodeQcow2Header,
  l1EntriesFor,
  l2EntryBytes,
  QCOW2_MAX_L1_BYTES,
  QCOW2_COMPAT_LAZY_REFCOUNTS,
  QCOW2_HDR,
  QCOW2_INCOMPAT,
  type Qcow2Header,
} from './header.js';
import { mapHostRun, type HostRunSource } from './host-run.js';
import { TableCache } from './l2-cache.js';
import { Mutex, RangeLock, SyncBatcher } from './locks.js';
import {
  decodeL1Entry,
  decodeL2Entry,
  encodeL1Entry,
  encodeL2Entry,
  makeGeometry,
  scanDataRun,
  scanUnallocatedRun,
  SUB_DATA,
  SUB_UNALLOCATED,
  SUB_ZERO,
  subclusterStatus,
  UNALLOCATED_ENTRY,
  type DataRun,
  type L2Entry,
  type Qcow2Geometry,
} from './map.js';
import { decodeReftable, RefcountManager, type ImageState } from './refcount.js';
import { readSnapshotTable, type Qcow2Snapshot } from './snapshot.js';
import { describeQcow2 } from './info.js';
import { adjustTreeRefcounts, encodeSnapshotTable, refreshCopiedFlags, snapshotExtraData, type SnapshotTarget } from './snapshot-ops.js';
import { writeU64 } from '../../util/u64.js';

export interface BackingRef {
  /** The name as stored in the image. */
  readonly fileName: string;
  /** The backing format extension, when present. */
  readonly format: string | null;
  /** fileName resolved against the image's directory. */
  readonly path: string;
}

export interface Qcow2OpenOptions {
  readonly readOnly?: boolean;
  /** The backing device, already opened (null: ignore the image's backing file). */
  readonly backing?: BlockDevice | null;
  /** Opens the backing file named in the image (any format); the driver closes what it returns. */
  readonly openBacking?: (ref: BackingRef) => Promise<BlockDevice>;
  /**
   * Opens the external data file (incompatible bit 2). Default: the name from the header
   * extension, resolved against the image's directory, opened like the image.
   */
  readonly openDataFile?: (ref: BackingRef, readOnly: boolean) => Promise<HostFile>;
  /** Serve this internal snapshot (by id, else by name) read-only instead of the active state. */
  readonly snapshot?: string;
  /** Bytes of L2 tables to cache (default 8 MiB). */
  readonly l2CacheBytes?: number;
  /** Bytes of refcount blocks to cache (default 1 MiB). */
  readonly refcountCacheBytes?: number;
}

interface Range {
  readonly what: string;
  readonly start: number;
  readonly end: number;
}

const DEFAULT_L2_CACHE_BYTES = 8 * 1024 * 1024;
const DEFAULT_REFCOUNT_CACHE_BYTES = 1024 * 1024;

export class Qcow2Device implements BlockDevice {
  /** Virtual size; changes only through resize(). */
  sizeBytes: number;
  readonly header: Qcow2Header;
  readonly geometry: Qcow2Geometry;
  readonly readOnly: boolean;
  private snapshotList: Qcow2Snapshot[];
  private snapshotsOffset: number;
  private readonly file: HostFile;
  /** Where guest data lives: the image itself or its external data file. */
  private readonly data: HostFile;
  /**
   * Guest data and compressed clusters on their way to the data file (see WriteCombiner):
   * compressed clusters packed one after another leave as one pwritev, and large writes go one
   * at a time, each with its new clusters reserved just before it. Beside one another, writes
   * and reservations spun on the file's inode lock (a third of the thread pool's time in a
   * raw -> qcow2 convert on 2 cores). Small random writes still go several at once.
   */
  private readonly dataWrites: WriteCombiner | null;
  private readonly backing: BlockDevice | null;
  private readonly state: ImageState;
  private l1: Buffer;
  private l1Offsets: number[];
  private l1TableOffset: number;
  private readonly l2Cache: TableCache;
  readonly refcounts: RefcountManager;
  private readonly metaLock = new Mutex();
  private readonly clusterLock = new RangeLock();
  private readonly lazyRefcounts: boolean;
  private dirty: boolean;
  private snapshotTableBytes: number;
  private readonly zeroCluster: Buffer;
  private closed = false;
  private readonly compressedSpace: CompressedAllocator;
  private readonly statusSource: StatusSource;
  private readonly imageSync: SyncBatcher;
  private readonly dataSync: SyncBatcher;
  private fixedCache: { reftableOffset: number; ranges: Range[] } | null = null;
  /** L1 entries changed in memory and not yet written. */
  private readonly dirtyL1 = new Set<number>();
  /** Host ranges whose references were dropped in memory: released after the drop is on disk. */
  private pendingFrees: { offset: number; bytes: number }[] = [];
  /** Bytes the image file has at least (it never shrinks while open). */
  private knownFileBytes: number;
  /** The snapshot served instead of the active state, if any. */
  readonly servedSnapshot: Qcow2Snapshot | null;

  private constructor(init: {
    file: HostFile;
    dataFile: HostFile | null;
    sizeBytes: number;
    l1TableOffset: number;
    snapshot: Qcow2Snapshot | null;
    header: Qcow2Header;
    readOnly: boolean;
    backing: BlockDevice | null;
    fileSize: number;
    l1: Buffer;
    l1Offsets: number[];
    reftable: number[];
    snapshots: Qcow2Snapshot[];
    snapshotTableBytes: number;
    opts: Qcow2OpenOptions;
  }) {
    const h = init.header;
    this.file = init.file;
    this.data = init.dataFile ?? init.file;
    const data = this.data;
    this.dataWrites = data.readOnly || data.inMemory ? null : new WriteCombiner(data.fd, data.isBlockDevice ? 16 : 1, (o, n) => data.reserve(o, n));
    this.imageSync = new SyncBatcher(() => this.file.datasync());
    this.dataSync = this.data === this.file ? this.imageSync : new SyncBatcher(() => this.data.datasync());
    this.header = h;
    this.sizeBytes = init.sizeBytes;
    this.servedSnapshot = init.snapshot;
    this.readOnly = init.readOnly;
    this.backing = init.backing;
    this.geometry = makeGeometry(h.clusterBits, (h.incompatibleFeatures & QCOW2_INCOMPAT.EXTL2) !== 0n, h.version, init.dataFile !== null);
    this.state = { fileEnd: init.fileSize };
    this.knownFileBytes = init.fileSize;
    this.l1 = init.l1;
    this.l1Offsets = init.l1Offsets;
    this.l1TableOffset = init.l1TableOffset;
    this.snapshotList = init.snapshots;
    this.snapshotsOffset = h.snapshotsOffset;
    this.snapshotTableBytes = init.snapshotTableBytes;
    this.lazyRefcounts = (h.compatibleFeatures & QCOW2_COMPAT_LAZY_REFCOUNTS) !== 0n;
    this.dirty = (h.incompatibleFeatures & QCOW2_INCOMPAT.DIRTY) !== 0n;
    this.zeroCluster = Buffer.alloc(h.clusterSize);
    const cs = h.clusterSize;
    this.l2Cache = new TableCache(
      (init.opts.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES) / cs,
      async (off) => {
        const b = Buffer.allocUnsafe(cs);
        await this.file.pread(b, off);
        return b;
      },
      (off, buf) => this.file.pwrite(buf, off),
    );
    this.refcounts = new RefcountManager({
      file: this.file,
      geometry: this.geometry,
      refcountOrder: h.refcountOrder,
      reftableOffset: h.refcountTableOffset,
      reftableClusters: h.refcountTableClusters,
      reftable: init.reftable,
      state: this.state,
      cacheTables: (init.opts.refcountCacheBytes ?? DEFAULT_REFCOUNT_CACHE_BYTES) / cs,
      fixedRanges: () => this.fixedRanges(),
    });
    this.compressedSpace = new CompressedAllocator(this.refcounts, cs, () => this.extendFile());
    this.refcounts.onFree = (c) => this.compressedSpace.forget(c);
    this.statusSource = {
      geometry: this.geometry,
      backing: this.backing,
      entry: (c) => this.entry(c),
      entryNow: (c) => this.entryNow(c),
      runNow: (c, max) => this.statusRunNow(c, max),
    };
  }

  /** Open a qcow2 image on `file`; the device owns the file and the backing device from then on. */
  static async open(file: HostFile, opts: Qcow2OpenOptions = {}): Promise<Qcow2Device> {
    const readOnly = opts.snapshot !== undefined ? true : (opts.readOnly ?? file.readOnly);
    if (!readOnly && file.readOnly) throw new UsageError('qcow2: a writable open needs a writable file');
    const fileSize = await hostFileSize(file);
    const probe = Buffer.alloc(Math.min(512, Math.max(fileSize, 0)));
    await file.pread(probe, 0);
    if (probe.length < 72) throw new CorruptImageError('qcow2 header: file too short');
    const bits = probe.readUInt32BE(20);
    const cluster0 = bits >= 9 && bits <= 21 ? Buffer.alloc(Math.min(2 ** bits, fileSize)) : probe;
    if (cluster0 !== probe) await file.pread(cluster0, 0);
    const header = decodeQcow2Header(cluster0, fileSize);
    const cs = header.clusterSize;
    if ((header.incompatibleFeatures & QCOW2_INCOMPAT.CORRUPT) !== 0n && !readOnly) {
      throw new UnsupportedImageError('qcow2: the image is marked corrupt; it can only be opened read-only');
    }
    const hasDataFile = (header.incompatibleFeatures & QCOW2_INCOMPAT.DATA_FILE) !== 0n;
    if (hasDataFile && header.dataFile === null && !opts.openDataFile) {
      throw new UnsupportedImageError('qcow2: the image uses an external data file but names none');
    }
    if (hasDataFile && header.nbSnapshots > 0) throw new CorruptImageError('qcow2: internal snapshots are not allowed with an external data file');
    const headerRange: Range = { what: 'header', start: 0, end: cs };
    const reftableRange: Range = { what: 'refcount table', start: header.refcountTableOffset, end: header.refcountTableOffset + header.refcountTableClusters * cs };
    const l1Range: Range = { what: 'L1 table', start: header.l1TableOffset, end: header.l1TableOffset + header.l1Size * 8 };

    let snapshots: Qcow2Snapshot[] = [];
    let snapshotTableBytes = 0;
    if (header.nbSnapshots > 0) {
      const t = await readSnapshotTable(file, header.snapshotsOffset, header.nbSnapshots, cs, fileSize, [headerRange, l1Range, reftableRange]);
      snapshots = t.snapshots;
      snapshotTableBytes = t.tableBytes;
    }
    let served: Qcow2Snapshot | null = null;
    if (opts.snapshot !== undefined) {
      if (opts.readOnly === false) throw new UsageError('qcow2: a snapshot can only be served read-only');
      served = snapshots.find((sn) => sn.id === opts.snapshot) ?? snapshots.find((sn) => sn.name === opts.snapshot) ?? null;
      if (served === null) throw new UsageError(`qcow2: no snapshot ${JSON.stringify(opts.snapshot)} in the image`);
    }
    const l1Size = served ? served.l1Size : header.l1Size;
    const l1TableOffset = served ? served.l1TableOffset : header.l1TableOffset;
    const sizeBytes = served ? (served.diskSizeBytes ?? header.sizeBytes) : header.sizeBytes;
    if (served && l1Size < l1EntriesFor(sizeBytes, header.clusterBits, l2EntryBytes(header))) throw new CorruptImageError(`qcow2: snapshot ${served.id} L1 table is too small for its disk size`);
    const tableRange: Range = { what: 'L1 table', start: l1TableOffset, end: l1TableOffset + l1Size * 8 };
    const l1 = Buffer.alloc(l1Size * 8);
    await file.pread(l1, l1TableOffset);
    const l1Offsets = new Array<number>(l1Size);
    for (let i = 0; i < l1Size; i++) {
      const e = decodeL1Entry(l1, i);
      if (e.l2Offset !== 0) validateTableCluster(`L2 table ${i}`, e.l2Offset, cs, fileSize, [headerRange, tableRange, reftableRange]);
      l1Offsets[i] = e.l2Offset;
    }
    const rtBuf = Buffer.alloc(header.refcountTableClusters * cs);
    await file.pread(rtBuf, header.refcountTableOffset);
    const reftable = decodeReftable(rtBuf, cs, fileSize, [headerRange, l1Range, reftableRange]);

    let dataFile: HostFile | null = null;
    if (hasDataFile) {
      const name = header.dataFile ?? '';
      const ref = { fileName: name, format: 'raw', path: isAbsolute(name) ? name : resolve(dirname(file.path), name) };
      dataFile = opts.openDataFile ? await opts.openDataFile(ref, readOnly) : await HostFile.open(ref.path, { readOnly });
    }
    let backing: BlockDevice | null = null;
    if (opts.backing !== undefined) backing = opts.backing;
    else if (header.backingFile !== null) {
      if (!opts.openBacking) throw new UnsupportedImageError(`qcow2: image has backing file ${JSON.stringify(header.backingFile)} but no way to open it was given`);
      const path = isAbsolute(header.backingFile) ? header.backingFile : resolve(dirname(file.path), header.backingFile);
      backing = await opts.openBacking({ fileName: header.backingFile, format: header.backingFormat, path });
    }
    const dev = new Qcow2Device({ file, dataFile, sizeBytes, l1TableOffset, snapshot: served, header, readOnly, backing, fileSize, l1, l1Offsets, reftable, snapshots, snapshotTableBytes, opts });
    if (!readOnly) {
      try {
        await dev.prepareWritable();
      } catch (err) {
        await backing?.close();
        await dataFile?.close();
        throw err;
      }
      dev.setWriteBack(true);
    }
    return dev;
  }

  /** Writable open: rebuild refcounts of a dirty image, clear autoclear bits we do not maintain. */
  private async prepareWritable(): Promise<void> {
    if (this.dirty) {
      await this.metaLock.run(() => checkQcow2(this.checkTarget(), 'all'));
      await this.setIncompatibleBit(QCOW2_INCOMPAT.DIRTY, false);
    }
    // "An implementation may only write to an image with unknown auto-clear features if it
    // clears the respective bits from this field first." Bitmaps are not updated by this driver.
    const keep = 0n;
    if ((this.header.autoclearFeatures & ~keep) !== 0n) {
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(this.header.autoclearFeatures & keep);
      await this.file.pwrite(b, QCOW2_HDR.AUTOCLEAR);
      await this.file.datasync();
    }
  }

  private incompatible = -1n;

  private setWriteBack(on: boolean): void {
    this.l2Cache.writeBack = on;
    this.refcounts.writeBack = on;
  }

  /**
   * Write cached metadata in dependency order (metadata lock held): refcount blocks, then (after
   * a flush, which also covers the guest data written so far) L2 tables, then (after a flush) L1
   * entries, then the deferred frees. The last writes are left unflushed: flush() adds that.
   */
  private async writeback(): Promise<void> {
    await this.growFile();
    const l2 = this.l2Cache.dirtyCount() > 0;
    const l1 = this.dirtyL1.size > 0;
    if (this.refcounts.dirtyCount() > 0) await this.refcounts.writeDirty();
    if (l2 || l1) await this.syncData();
    if (l2) await this.l2Cache.writeDirty();
    if (l1) {
      if (l2) await this.imageSync.sync();
      const idx = [...this.dirtyL1].sort((a, b) => a - b);
      // One write per run of adjacent entries; an entry stays dirty until its write succeeded.
      for (let i = 0; i < idx.length; ) {
        let j = i + 1;
        while (j < idx.length && idx[j] === idx[j - 1]! + 1) j++;
        const from = idx[i]! * 8;
        const to = (idx[j - 1]! + 1) * 8;
        await this.file.pwrite(Buffer.from(this.l1.subarray(from, to)), this.l1TableOffset + from);
        for (let k = i; k < j; k++) this.dirtyL1.delete(idx[k]!);
        i = j;
      }
    }
    if (this.pendingFrees.length > 0) {
      await this.imageSync.sync();
      const frees = this.pendingFrees;
      this.pendingFrees = [];
      for (const f of frees) await this.refcounts.release(f.offset, f.bytes);
      await this.refcounts.writeDirty();
    }
  }

  /** Bound the caches: dirty tables cannot be evicted, so write them back once there are many. */
  private async writebackIfFull(): Promise<void> {
    if (
      this.l2Cache.dirtyCount() * 2 >= this.l2Cache.capacity ||
      this.refcounts.dirtyCount() * 2 >= this.refcounts.cacheCapacity ||
      this.pendingFrees.length >= 4096
    ) {
      await this.writeback();
    }
  }

  /** Metadata changes of a request: the caches stay bounded afterwards. */
  private meta<T>(fn: () => Promise<T>): Promise<T> {
    return this.metaLock.run(async () => {
      const r = await fn();
      await this.writebackIfFull();
      return r;
    });
  }

  /**
   * No request in flight, metadata lock held, everything written back and flushed, caches
   * write-through: for operations that order their own writes (snapshots, resize, check).
   */
  private quiesced<T>(fn: () => Promise<T>): Promise<T> {
    return this.clusterLock.run(0, Number.MAX_SAFE_INTEGER, true, () =>
      this.metaLock.run(async () => {
        if (this.readOnly) return fn();
        await this.writeback();
        await this.syncData();
        this.setWriteBack(false);
        try {
          return await fn();
        } finally {
          this.setWriteBack(true);
        }
      }),
    );
  }

  private async setIncompatibleBit(bit: bigint, on: boolean): Promise<void> {
    if (this.incompatible < 0n) this.incompatible = this.header.incompatibleFeatures;
    this.incompatible = on ? this.incompatible | bit : this.incompatible & ~bit;
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(this.incompatible);
    await this.file.pwrite(b, QCOW2_HDR.INCOMPATIBLE);
    await this.file.datasync();
    if (bit === QCOW2_INCOMPAT.DIRTY) this.dirty = on;
  }

  private fixedRanges(): Range[] {
    if (this.fixedCache?.reftableOffset === this.refcounts.reftableOffset) return this.fixedCache.ranges;
    const cs = this.geometry.clusterSize;
    const r: Range[] = [
      { what: 'header', start: 0, end: cs },
      { what: 'L1 table', start: this.l1TableOffset, end: this.l1TableOffset + this.l1Offsets.length * 8 },
      { what: 'refcount table', start: this.refcounts.reftableOffset, end: this.refcounts.reftableOffset + this.refcounts.reftableClusters * cs },
    ];
    if (this.snapshotTableBytes > 0) r.push({ what: 'snapshot table', start: this.snapshotsOffset, end: this.snapshotsOffset + this.snapshotTableBytes });
    this.fixedCache = { reftableOffset: this.refcounts.reftableOffset, ranges: r };
    return r;
  }

  /** What the consistency checker needs to see of this image. */
  checkTarget(): CheckTarget {
    return {
      file: this.file,
      header: this.header,
      geometry: this.geometry,
      l1TableOffset: this.l1TableOffset,
      l1Offsets: this.l1Offsets,
      l1: this.l1,
      l2Cache: this.l2Cache,
      snapshots: this.snapshotList,
      snapshotsOffset: this.snapshotsOffset,
      snapshotTableBytes: this.snapshotTableBytes,
      refcounts: this.refcounts,
      state: this.state,
      sizeBytes: this.sizeBytes,
    };
  }

  /** Check refcount consistency (and repair per `mode`), like `qemu-img check`. */
  async check(mode: CheckMode = 'none'): Promise<CheckResult> {
    if (this.servedSnapshot !== null) throw new UsageError('qcow2: check the image, not a snapshot opened from it');
    if (mode !== 'none') this.assertWritable();
    return this.quiesced(() => checkQcow2(this.checkTarget(), mode));
  }

  capabilities(): Capabilities {
    const w = !this.readOnly;
    return { writable: w, flush: w, fua: w, trim: w, zero: w, fastZero: w, extents: true, allocationDepth: true, cache: false, multiConn: true, rotational: false };
  }

  blockSizes(): BlockSizes {
    return { minimum: 1, preferred: Math.max(4096, this.geometry.subclusterSize), maximum: 32 * 1024 * 1024 };
  }

  private clusterRange(offset: number, length: number): [number, number] {
    const cb = this.geometry.clusterBits;
    return [Math.floor(offset / 2 ** cb), Math.floor((offset + Math.max(length, 1) - 1) / 2 ** cb)];
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new RequestError('EINVAL', `qcow2: request [${offset}, +${length}) is outside the ${this.sizeBytes}-byte disk`);
    }
  }

  private assertWritable(): void {
    if (this.readOnly) throw new RequestError('EPERM', 'qcow2: image is open read-only');
    if (this.closed) throw new RequestError('ESHUTDOWN', 'qcow2: image is closed');
    if (this.markedCorrupt) throw new RequestError('EIO', 'qcow2: image was found corrupt and is now read-only');
  }

  private markedCorrupt = false;

  /**
   * Corruption found while writing: like QEMU, set the corrupt bit ("the image must not be
   * written to") and refuse further writes, so damage does not spread.
   */
  private async guardCorrupt<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof CorruptImageError && !this.markedCorrupt) {
        this.markedCorrupt = true;
        await this.setIncompatibleBit(QCOW2_INCOMPAT.CORRUPT, true).catch(() => undefined);
      }
      throw err;
    }
  }

  // ---- mapping -------------------------------------------------------------------------------

  private async l2Table(l1Index: number): Promise<Buffer | null> {
    const off = this.l1Offsets[l1Index] ?? 0;
    if (off === 0) return null;
    return this.l2Cache.get(off);
  }

  private async entry(cluster: number): Promise<L2Entry> {
    return this.entryNow(cluster) ?? this.loadEntry(cluster);
  }

  /** The entry once its L2 table is loaded (entryNow first: this is the slow path). */
  private async loadEntry(cluster: number): Promise<L2Entry> {
    const table = await this.l2Table(Math.floor(cluster / this.geometry.l2Entries));
    return table === null ? UNALLOCATED_ENTRY : this.decodeEntry(table, cluster);
  }

  /**
   * The entry, here and now, when its L2 table is cached (or there is none): a copy walks 32
   * clusters per 2 MiB request, and a round of promises for each one cost more than the decoding.
   */
  private entryNow(cluster: number): L2Entry | undefined {
    const off = this.l1Offsets[Math.floor(cluster / this.geometry.l2Entries)] ?? 0;
    if (off === 0) return UNALLOCATED_ENTRY;
    const table = this.l2Cache.getNow(off);
    return table === undefined ? undefined : this.decodeEntry(table, cluster);
  }

  private decodeEntry(table: Buffer, cluster: number): L2Entry {
    const g = this.geometry;
    const e = decodeL2Entry(g, table, cluster % g.l2Entries, this.state.fileEnd);
    if (e.hasHost) {
      if (!g.externalData) this.checkDataCluster(e.hostOffset, cluster);
      else if (e.hostOffset !== cluster * g.clusterSize) {
        throw new CorruptImageError(`qcow2: guest cluster ${cluster} maps to data file offset ${e.hostOffset}, not its own offset`);
      }
    }
    return e;
  }

  /**
   * The host-contiguous run of plain data clusters from `cluster` on (at most `max`, within one
   * L2 table), when its table is cached and the run touches no metadata; null otherwise, leaving
   * the cluster to entry() and its checks. `peek` keeps the table's recency as it is.
   */
  private dataRunNow(cluster: number, max: number, peek: boolean, owned = false): DataRun | null {
    const g = this.geometry;
    if (g.extL2 || g.externalData) return null;
    const off = this.l1Offsets[Math.floor(cluster / g.l2Entries)] ?? 0;
    const table = off === 0 ? undefined : peek ? this.l2Cache.peek(off) : this.l2Cache.getNow(off);
    if (table === undefined) return null;
    const index = cluster % g.l2Entries;
    const run = scanDataRun(g, table, index, Math.min(max, g.l2Entries - index), this.state.fileEnd, owned);
    if (run.count === 0) return null;
    const end = run.host + run.count * g.clusterSize;
    for (const r of this.fixedRanges()) if (run.host < r.end && r.start < end) return null;
    return run;
  }

  /** A run of data or unallocated clusters from `cluster` on, for block status (see StatusSource.runNow). */
  private statusRunNow(cluster: number, max: number): { status: number; count: number } | null {
    const data = this.dataRunNow(cluster, max, false);
    if (data !== null) return { status: SUB_DATA, count: data.count };
    const g = this.geometry;
    if (g.extL2) return null;
    const off = this.l1Offsets[Math.floor(cluster / g.l2Entries)] ?? 0;
    const table = off === 0 ? undefined : this.l2Cache.getNow(off);
    if (table === undefined) return null;
    const index = cluster % g.l2Entries;
    const count = scanUnallocatedRun(table, index, Math.min(max, g.l2Entries - index));
    return count === 0 ? null : { status: SUB_UNALLOCATED, count };
  }

  private checkDataCluster(hostOffset: number, cluster: number): void {
    for (const r of this.fixedRanges()) {
      if (hostOffset < r.end && r.start < hostOffset + this.geometry.clusterSize) {
        throw new CorruptImageError(`qcow2: guest cluster ${cluster} maps to host offset ${hostOffset}, inside the ${r.what}`);
      }
    }
  }

  // ---- reads ---------------------------------------------------------------------------------

  /** What mapHostRun reads of this image; its getters see the current tables. */
  private runSourceValue: HostRunSource | null = null;
  /** No-wait reads of the data file (every host run is in it). */
  private nowaitValue: NowaitReader | null = null;

  private get runSource(): HostRunSource {
    if (this.runSourceValue === null) {
      // eslint-disable-next-line @typescript-eslint/no-this-alias
      const dev = this;
      this.runSourceValue = {
        geometry: this.geometry,
        get l1Offsets() {
          return dev.l1Offsets;
        },
        peekTable: (off) => this.l2Cache.peek(off),
        get fileEnd() {
          return dev.state.fileEnd;
        },
        dataFd: this.data.fd,
        checkDataCluster: (host, cluster) => this.checkDataCluster(host, cluster),
        dataRun: (cluster, max) => this.dataRunNow(cluster, max, true),
      };
    }
    return this.runSourceValue;
  }

  hostRun(offset: number, length: number): HostRun | null {
    if (this.closed || !Number.isSafeInteger(offset) || offset < 0 || length <= 0 || offset + length > this.sizeBytes) return null;
    return mapHostRun(this.runSource, offset, length);
  }

  /** Plain data whose L2 entries are cached and whose bytes are in the page cache: read here and now. */
  readNow(buf: Buffer, offset: number): boolean {
    const run = this.hostRun(offset, buf.length);
    if (run === null || run.length !== buf.length) return false;
    this.nowaitValue ??= new NowaitReader(run.fd);
    return this.nowaitValue.read(buf, run.offset);
  }

  /**
   * A write into data clusters this image owns alone (no allocation, no copy-on-write, no
   * metadata), whose entries are cached, that no request holds and no queued write overlaps:
   * done here and now with one pwrite, as writeGuest would do it, minus the waiting.
   */
  writeNow(buf: Buffer, offset: number): boolean {
    if (this.readOnly || this.closed || this.markedCorrupt || buf.length === 0) return false;
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + buf.length > this.sizeBytes) return false;
    const [first, last] = this.clusterRange(offset, buf.length);
    if (!this.clusterLock.idle(first, last)) return false;
    const run = this.dataRunNow(first, last - first + 1, true, true);
    if (run === null || run.count < last - first + 1) return false;
    const host = run.host + (offset - first * this.geometry.clusterSize);
    if (this.dataWrites?.overlaps(host, buf.length) === true) return false;
    try {
      this.data.pwriteNow(buf, host);
    } catch {
      // Written in part or not at all: the ordinary path writes it again and reports the error.
      return false;
    }
    return true;
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    this.checkRange(offset, buf.length);
    if (buf.length === 0) return;
    const [first, last] = this.clusterRange(offset, buf.length);
    await this.clusterLock.run(first, last, false, () => this.readGuest(buf, offset));
  }

  /** Read guest data without taking locks (callers hold the cluster range). */
  private async readGuest(buf: Buffer, offset: number): Promise<void> {
    const g = this.geometry;
    const pending: Promise<void>[] = [];
    // Host-contiguous data runs are coalesced into one read.
    let runHost = -1;
    let runBuf = 0;
    let runLen = 0;
    const flushRun = (): void => {
      if (runLen > 0) pending.push(this.data.pread(buf.subarray(runBuf, runBuf + runLen), runHost));
      runLen = 0;
    };
    // Likewise guest-contiguous unallocated ranges become one backing read.
    let backBuf = 0;
    let backLen = 0;
    const flushBacking = (): void => {
      if (backLen > 0) pending.push(this.readBacking(buf.subarray(backBuf, backBuf + backLen), offset + backBuf));
      backLen = 0;
    };
    let done = 0;
    while (done < buf.length) {
      const guest = offset + done;
      const cluster = Math.floor(guest / g.clusterSize);
      const inCluster = guest - cluster * g.clusterSize;
      const e = this.entryNow(cluster) ?? (await this.loadEntry(cluster));
      const clusterEnd = Math.min(g.clusterSize, inCluster + (buf.length - done));
      if (e.compressed) {
        flushRun();
        flushBacking();
        const n = clusterEnd - inCluster;
        const at = done;
        pending.push(this.readCompressed(e).then((data) => void data.copy(buf, at, inCluster, inCluster + n)));
        done += n;
        continue;
      }
      let pos = inCluster;
      while (pos < clusterEnd) {
        const sub = Math.floor(pos / g.subclusterSize);
        const status = subclusterStatus(e, sub);
        let end = (sub + 1) * g.subclusterSize;
        for (let s = sub + 1; s < g.subclusters && subclusterStatus(e, s) === status; s++) end = (s + 1) * g.subclusterSize;
        end = Math.min(end, clusterEnd);
        const n = end - pos;
        const bufAt = done + (pos - inCluster);
        if (status !== SUB_UNALLOCATED) flushBacking();
        if (status === SUB_DATA) {
          const host = e.hostOffset + pos;
          if (runLen > 0 && runHost + runLen === host && runBuf + runLen === bufAt) runLen += n;
          else {
            flushRun();
            runHost = host;
            runBuf = bufAt;
            runLen = n;
          }
        } else {
          flushRun();
          if (status === SUB_ZERO) buf.fill(0, bufAt, bufAt + n);
          else if (backLen > 0 && backBuf + backLen === bufAt) backLen += n;
          else {
            flushBacking();
            backBuf = bufAt;
            backLen = n;
          }
        }
        pos = end;
      }
      done += clusterEnd - inCluster;
    }
    flushRun();
    flushBacking();
    await Promise.all(pending);
  }

  /** Unallocated ranges: backing data, zeros past the backing's end or without a backing. */
  private readBacking(buf: Buffer, offset: number): Promise<void> {
    return readFromBacking(this.backing, buf, offset);
  }

  private async readCompressed(e: L2Entry): Promise<Buffer> {
    const src = Buffer.allocUnsafe(e.compressedBytes);
    await this.file.pread(src, e.compressedOffset);
    const out = Buffer.allocUnsafe(this.geometry.clusterSize);
    await decompressCluster(this.header.compressionType, src, out);
    return out;
  }

  // ---- writes --------------------------------------------------------------------------------

  async pwrite(buf: Buffer, offset: number, opts: WriteOptions = {}): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, buf.length);
    if (buf.length === 0) return;
    const [first, last] = this.clusterRange(offset, buf.length);
    await this.guardCorrupt(() => this.clusterLock.run(first, last, true, () => this.writeGuest(buf, offset)));
    if (opts.fua) await this.flush();
  }

  /** Write guest data; callers hold the cluster range exclusively. */
  private async writeGuest(buf: Buffer, offset: number): Promise<void> {
    const g = this.geometry;
    const cs = g.clusterSize;
    const plans: ClusterPlan[] = [];
    for (let done = 0; done < buf.length; ) {
      const guest = offset + done;
      const cluster = Math.floor(guest / cs);
      const a = guest - cluster * cs;
      const b = Math.min(cs, a + buf.length - done);
      const p = planWrite(g, cluster, a, b, this.entryNow(cluster) ?? (await this.loadEntry(cluster)));
      plans.push(p);
      done += b - a;
    }

    const toAllocate = plans.filter((p) => p.allocate);
    // Host clusters from here on were never written: past the file's end when it was opened,
    // and past every cluster allocated since (fileEnd only grows).
    let neverWritten = Infinity;
    if (g.externalData) {
      // "The offset field in the Standard Cluster Descriptor must match the guest offset."
      for (const p of toAllocate) p.hostOffset = p.cluster * cs;
    } else if (toAllocate.length > 0) {
      await this.meta(async () => {
        await this.markDirtyIfLazy();
        const fileEnd = this.state.fileEnd;
        const base = await this.refcounts.allocate(toAllocate.length);
        toAllocate.forEach((p, i) => (p.hostOffset = base + i * cs));
        // A block device holds whatever was there before; a file reads zeros where it never had data.
        if (!this.file.isBlockDevice) neverWritten = fileEnd;
        await this.extendFile();
      });
    }

    // Data, with copy-on-write of the parts of each span the caller did not supply. Spans the
    // caller covers whole and that follow each other on the host go out as one write.
    const direct: { host: number; from: number; to: number }[] = [];
    for (const p of plans) {
      if (p.spanStart !== p.a || p.spanEnd !== p.b) continue;
      const from = p.cluster * cs + p.a - offset;
      const last = direct[direct.length - 1];
      if (last !== undefined && last.to === from && last.host + (last.to - last.from) === p.hostOffset + p.a) last.to = from + p.b - p.a;
      else direct.push({ host: p.hostOffset + p.a, from, to: from + p.b - p.a });
    }
    await Promise.all([
      ...direct.map((d) => this.writeData(buf.subarray(d.from, d.to), d.host)),
      ...plans.filter((p) => p.spanStart !== p.a || p.spanEnd !== p.b).map(async (p) => {
        const src = buf.subarray(p.cluster * cs + p.a - offset, p.cluster * cs + p.b - offset);
        // The rest of a never-written cluster already reads as zeros, which is what the guest
        // reads around [a, b) here: only the caller's bytes are written (as QEMU zeroes the
        // cluster rather than copying zeros). A 4 KiB write to a fresh image writes 4 KiB, not 64.
        if (p.hostOffset >= neverWritten && !g.extL2 && !p.old.hasHost && !p.old.compressed && (this.backing === null || p.old.zero !== 0)) {
          await this.writeData(src, p.hostOffset + p.a);
          return;
        }
        const span = Buffer.allocUnsafe(p.spanEnd - p.spanStart);
        const base = p.cluster * cs + p.spanStart;
        if (p.a > p.spanStart) await this.readGuest(span.subarray(0, p.a - p.spanStart), base);
        if (p.spanEnd > p.b) await this.readGuest(span.subarray(p.b - p.spanStart), p.cluster * cs + p.b);
        src.copy(span, p.a - p.spanStart);
        await this.writeData(span, p.hostOffset + p.spanStart);
      }),
    ]);
    const updates = plans.filter((p) => p.updateEntry);
    if (updates.length === 0) return;
    await this.meta(async () => {
      await this.writeEntries(updates.map((p) => ({ cluster: p.cluster, entry: { hostOffset: p.hostOffset, copied: true, alloc: p.newAlloc, zero: p.newZero } })));
      this.releaseOld(toAllocate.map((p) => p.old));
    });
  }

  private writeData(buf: Buffer, hostOffset: number): Promise<void> {
    return this.dataWrites === null ? this.data.pwrite(buf, hostOffset) : this.dataWrites.write(buf, hostOffset);
  }

  /** Free the host storage of replaced entries once their replacements are on disk (writeback). */
  private releaseOld(olds: readonly L2Entry[]): void {
    if (this.geometry.externalData) return;
    for (const e of olds) {
      if (e.compressed) this.pendingFrees.push({ offset: Math.floor(e.compressedOffset / 512) * 512, bytes: e.compressedBytes + (e.compressedOffset % 512) });
      else if (e.hasHost) this.pendingFrees.push({ offset: e.hostOffset, bytes: this.geometry.clusterSize });
    }
  }

  private async markDirtyIfLazy(): Promise<void> {
    if (this.lazyRefcounts && !this.dirty) await this.setIncompatibleBit(QCOW2_INCOMPAT.DIRTY, true);
  }

  /**
   * The host file must cover every allocated cluster before metadata naming one reaches the
   * disk. In write-back mode that is writeback()'s first step, so allocations skip the
   * fstat and ftruncate, which would serialise with the data writes in flight.
   */
  private async extendFile(): Promise<void> {
    if (this.file.isBlockDevice) {
      if (this.state.fileEnd <= this.knownFileBytes) return;
      this.knownFileBytes = await hostFileSize(this.file);
      // A block device cannot grow: the allocation leaks, the request fails.
      if (this.state.fileEnd > this.knownFileBytes) throw new RequestError('ENOSPC', `qcow2: ${this.file.path} is full`);
      return;
    }
    if (!this.l2Cache.writeBack) await this.growFile();
  }

  private async growFile(): Promise<void> {
    if (this.file.isBlockDevice || this.state.fileEnd <= this.knownFileBytes) return;
    const size = await hostFileSize(this.file);
    if (size < this.state.fileEnd) await this.file.truncate(this.state.fileEnd);
    this.knownFileBytes = Math.max(size, this.state.fileEnd);
  }

  /** Install new L2 entries (metadata lock held), allocating or copying L2 tables as needed. */
  private async writeEntries(updates: readonly { cluster: number; entry: EntryUpdate }[]): Promise<void> {
    const g = this.geometry;
    const byTable = new Map<number, typeof updates[number][]>();
    for (const u of updates) {
      const l1Index = Math.floor(u.cluster / g.l2Entries);
      let list = byTable.get(l1Index);
      if (!list) byTable.set(l1Index, (list = []));
      list.push(u);
    }
    for (const [l1Index, list] of byTable) {
      const tableOffset = await this.writableL2(l1Index);
      const table = await this.l2Cache.get(tableOffset);
      let lo = Infinity;
      let hi = 0;
      for (const u of list) {
        const idx = u.cluster % g.l2Entries;
        encodeL2Entry(g, table, idx, u.entry);
        lo = Math.min(lo, idx * g.l2EntryBytes);
        hi = Math.max(hi, (idx + 1) * g.l2EntryBytes);
      }
      await this.l2Cache.write(tableOffset, table, { start: lo, end: hi });
    }
  }

  /** The offset of an L2 table for `l1Index` that may be modified in place (refcount 1). */
  private async writableL2(l1Index: number): Promise<number> {
    const cs = this.geometry.clusterSize;
    const cur = this.l1Offsets[l1Index]!;
    if (cur !== 0 && decodeL1Entry(this.l1, l1Index).copied) return cur;
    await this.markDirtyIfLazy();
    const fresh = Buffer.alloc(cs);
    if (cur !== 0) (await this.l2Cache.get(cur)).copy(fresh);
    // A data cluster's refcount counts the L2 tables mapping it: the copy takes over the old
    // table's reference, so refcounts stay as they are, but entries may be shared: clear COPIED.
    const off = await this.refcounts.allocate(1);
    await this.extendFile();
    if (cur !== 0) {
      for (let i = 0; i < this.geometry.l2Entries; i++) {
        const pos = i * this.geometry.l2EntryBytes;
        fresh.writeUInt32BE(fresh.readUInt32BE(pos) & 0x7fffffff, pos);
      }
    }
    await this.l2Cache.write(off, fresh);
    encodeL1Entry(this.l1, l1Index, off, true);
    this.dirtyL1.add(l1Index);
    this.l1Offsets[l1Index] = off;
    if (cur !== 0) {
      this.l2Cache.evict(cur);
      this.pendingFrees.push({ offset: cur, bytes: cs });
    }
    return off;
  }


  /**
   * Write one whole guest cluster compressed (the last one may be short), packing the data
   * byte-granular after the previous compressed cluster like QEMU. Falls back to a plain write
   * when the data does not compress.
   */
  async writeCompressed(buf: Buffer, offset: number, precompressed?: Buffer | null): Promise<void> {
    const packed = precompressed !== undefined ? precompressed : await this.compressWhole(buf, offset);
    await this.writeCompressedRun(buf, offset, [packed]);
  }

  private compressWhole(buf: Buffer, offset: number): Promise<Buffer | null> {
    this.checkCompressedRun(buf, offset, 1);
    const cs = this.geometry.clusterSize;
    const full = buf.length === cs ? buf : Buffer.concat([buf, Buffer.alloc(cs - buf.length)]);
    return compressCluster(this.header.compressionType, full);
  }

  private checkCompressedRun(buf: Buffer, offset: number, clusters: number): void {
    this.assertWritable();
    const cs = this.geometry.clusterSize;
    const whole = clusters * cs;
    if (offset % cs !== 0 || clusters < 1 || (buf.length !== whole && !(buf.length > whole - cs && buf.length < whole && offset + buf.length === this.sizeBytes))) {
      throw new RequestError('EINVAL', 'qcow2: compressed writes cover whole clusters');
    }
    this.checkRange(offset, buf.length);
    if (this.geometry.externalData) throw new UnsupportedImageError('qcow2: compressed clusters are not allowed with an external data file');
  }

  /**
   * Write consecutive whole guest clusters, each given compressed by the caller (`packed[i]`,
   * null when it did not shrink), as one request: one lock, one allocation and one L2 update
   * for all of them. Clusters that do not compress are written plainly, as QEMU does, runs of
   * them in one write.
   */
  async writeCompressedRun(buf: Buffer, offset: number, packed: readonly (Buffer | null)[]): Promise<void> {
    this.checkCompressedRun(buf, offset, packed.length);
    const g = this.geometry;
    const cs = g.clusterSize;
    const first = offset / cs;
    // QEMU writes a cluster plainly when compression does not fit in less than a cluster.
    const plain = (i: number): boolean => packed[i] === null || packed[i]!.length > cs - 512;
    await this.guardCorrupt(() =>
      this.clusterLock.run(first, first + packed.length - 1, true, async () => {
        const writes: Promise<void>[] = [];
        for (let i = 0; i < packed.length; ) {
          if (!plain(i)) {
            i++;
            continue;
          }
          let j = i + 1;
          while (j < packed.length && plain(j)) j++;
          writes.push(this.writeGuest(buf.subarray(i * cs, Math.min(buf.length, j * cs)), offset + i * cs));
          i = j;
        }
        const clusters: number[] = [];
        for (let i = 0; i < packed.length; i++) if (!plain(i)) clusters.push(first + i);
        if (clusters.length > 0) writes.push(this.writeCompressedClusters(clusters, clusters.map((c) => packed[c - first]!)));
        await Promise.all(writes);
      }),
    );
  }

  /** Compressed clusters (callers hold their locks): data first, then the L2 entries naming it. */
  private async writeCompressedClusters(clusters: readonly number[], packed: readonly Buffer[]): Promise<void> {
    const g = this.geometry;
    const olds = await Promise.all(clusters.map((c) => this.entry(c)));
    const hosts = await this.meta(async () => {
      await this.markDirtyIfLazy();
      const out: number[] = [];
      for (const p of packed) out.push(await this.compressedSpace.allocate(p.length));
      return out;
    });
    // Packed clusters are allocated one after another: written back to back, they merge.
    await Promise.all(packed.map((p, i) => this.writeData(p, hosts[i]!)));
    await this.meta(async () => {
      for (let i = 0; i < clusters.length; ) {
        const l1Index = Math.floor(clusters[i]! / g.l2Entries);
        const tableOffset = await this.writableL2(l1Index);
        const table = await this.l2Cache.get(tableOffset);
        let lo = Infinity;
        let hi = 0;
        for (; i < clusters.length && Math.floor(clusters[i]! / g.l2Entries) === l1Index; i++) {
          const idx = clusters[i]! % g.l2Entries;
          encodeCompressedEntry(g, table, idx, hosts[i]!, packed[i]!.length);
          lo = Math.min(lo, idx * g.l2EntryBytes);
          hi = Math.max(hi, (idx + 1) * g.l2EntryBytes);
        }
        await this.l2Cache.write(tableOffset, table, { start: lo, end: hi });
      }
      this.releaseOld(olds);
    });
  }

  // ---- zero and trim -------------------------------------------------------------------------

  /** Whole (sub)clusters of [offset, offset+length): the end of the disk counts as a boundary. */
  private forEachCluster(offset: number, length: number, fn: (cluster: number, a: number, b: number) => void): void {
    const cs = this.geometry.clusterSize;
    for (let pos = offset; pos < offset + length; ) {
      const cluster = Math.floor(pos / cs);
      const a = pos - cluster * cs;
      const b = Math.min(cs, a + offset + length - pos);
      fn(cluster, a, b);
      pos += b - a;
    }
  }

  async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, length);
    if (length === 0) return;
    const g = this.geometry;
    const cs = g.clusterSize;
    const [first, last] = this.clusterRange(offset, length);
    await this.guardCorrupt(() => this.clusterLock.run(first, last, true, async () => {
      const slow: { offset: number; length: number }[] = [];
      const updates: { cluster: number; entry: EntryUpdate }[] = [];
      const olds: L2Entry[] = [];
      const clusters: [number, number, number][] = [];
      this.forEachCluster(offset, length, (c, a, b) => clusters.push([c, a, b]));
      for (const [c, a, b] of clusters) {
        const virtEnd = Math.min(cs, this.sizeBytes - c * cs);
        const sub = g.subclusterSize;
        // Whole subclusters covered (the disk's end closes a partial last subcluster).
        const zs = Math.ceil(a / sub) * sub;
        const ze = b >= virtEnd ? Math.ceil(b / sub) * sub : Math.floor(b / sub) * sub;
        if (a < Math.min(zs, b)) slow.push({ offset: c * cs + a, length: Math.min(zs, b) - a });
        if (ze < b && ze >= zs) slow.push({ offset: c * cs + ze, length: b - ze });
        if (ze <= zs) continue;
        const e = await this.entry(c);
        const d = planZero(g, e, touchedSubclusters(g, zs, ze), opts.mayTrim ?? false, this.backing !== null);
        if (d.kind === 'update') {
          updates.push({ cluster: c, entry: d.entry });
          if (d.releaseOld) olds.push(e);
        } else if (d.kind === 'write') slow.push({ offset: c * cs + zs, length: Math.min(ze, virtEnd) - zs });
      }
      if (opts.fast && slow.length > 0) throw new RequestError('ENOTSUP', 'qcow2: this zero request cannot be done without writing data');
      if (updates.length > 0) {
        await this.meta(async () => {
          await this.writeEntries(updates);
          this.releaseOld(olds);
        });
      }
      for (const s of slow) {
        for (let done = 0; done < s.length; done += cs) {
          const n = Math.min(cs, s.length - done);
          await this.writeGuest(this.zeroCluster.subarray(0, n), s.offset + done);
        }
      }
    }));
    if (opts.fua) await this.flush();
  }

  async trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, length);
    if (length === 0) return;
    const g = this.geometry;
    const cs = g.clusterSize;
    // Without a zero flag, discarding would expose stale backing data: QEMU ignores it too.
    if (!g.zeroFlag && !g.extL2 && this.backing !== null) return;
    const [first, last] = this.clusterRange(offset, length);
    await this.guardCorrupt(() => this.clusterLock.run(first, last, true, async () => {
      const updates: { cluster: number; entry: EntryUpdate }[] = [];
      const olds: L2Entry[] = [];
      const clusters: [number, number, number][] = [];
      this.forEachCluster(offset, length, (c, a, b) => clusters.push([c, a, b]));
      for (const [c, a, b] of clusters) {
        // Like QEMU, only whole clusters are discarded (the disk's end closes the last one).
        if (a !== 0 || (b !== cs && c * cs + b !== this.sizeBytes)) continue;
        const e = await this.entry(c);
        const entry = planTrim(g, e, this.backing !== null);
        if (entry === null) continue;
        updates.push({ cluster: c, entry });
        olds.push(e);
      }
      if (updates.length === 0) return;
      await this.meta(async () => {
        await this.writeEntries(updates);
        this.releaseOld(olds);
      });
    }));
    if (opts.fua) await this.flush();
  }

  /** Everything acknowledged so far becomes durable: metadata written back, then flushed. */
  async flush(): Promise<void> {
    if (this.readOnly) return;
    await this.metaLock.run(() => this.writeback());
    await this.syncData();
  }

  /** Data file first: metadata must never reach the disk ahead of the data it describes. */
  private async syncData(): Promise<void> {
    if (this.data !== this.file) await this.dataSync.sync();
    await this.imageSync.sync();
  }

  /** The internal snapshots, in table order. */
  get snapshots(): readonly Qcow2Snapshot[] {
    return this.snapshotList;
  }

  /** qemu-img info's image-specific keys (cluster size, backing file, snapshots, format-specific). */
  imageInfo(): Record<string, unknown> {
    const h = this.header;
    const d = describeQcow2(h, this.snapshotList);
    const o: Record<string, unknown> = {};
    if (h.backingFile !== null && h.backingFormat !== null) o['backing-filename-format'] = h.backingFormat;
    if (d.snapshots.length > 0) o.snapshots = d.snapshots;
    o['cluster-size'] = this.geometry.clusterSize;
    o['format-specific'] = d.formatSpecific;
    if (h.backingFile !== null) {
      o['full-backing-filename'] = isAbsolute(h.backingFile) ? h.backingFile : join(dirname(this.file.path), h.backingFile);
      o['backing-filename'] = h.backingFile;
    }
    o['dirty-flag'] = this.dirty;
    return o;
  }

  private findSnapshot(idOrName: string): Qcow2Snapshot {
    const s = this.snapshotList.find((sn) => sn.id === idOrName) ?? this.snapshotList.find((sn) => sn.name === idOrName);
    if (!s) throw new UsageError(`qcow2: no snapshot ${JSON.stringify(idOrName)} in the image`);
    return s;
  }

  private assertSnapshotsWritable(): void {
    this.assertWritable();
    if (this.servedSnapshot !== null) throw new UsageError('qcow2: snapshots cannot be changed through a snapshot view');
    if (this.geometry.externalData) throw new UnsupportedImageError('qcow2: internal snapshots are not allowed with an external data file');
  }

  /** Everything quiesced: no request in flight, metadata lock held. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.guardCorrupt(() => this.quiesced(fn));
  }

  private snapshotTarget(): SnapshotTarget {
    return { file: this.file, geometry: this.geometry, refcounts: this.refcounts, l2Cache: this.l2Cache, state: this.state };
  }

  /** Write `list` as a new snapshot table, switch the header to it, free the old one. */
  private async writeSnapshotTable(list: Qcow2Snapshot[]): Promise<void> {
    const cs = this.geometry.clusterSize;
    const table = encodeSnapshotTable(list);
    let off = 0;
    if (table.length > 0) {
      off = await this.refcounts.allocate(Math.ceil(table.length / cs));
      await this.extendFile();
      await this.file.pwrite(table, off);
    }
    await this.imageSync.sync();
    const hdr = Buffer.alloc(12);
    hdr.writeUInt32BE(list.length, 0);
    writeU64(hdr, off, 4);
    await this.file.pwrite(hdr, QCOW2_HDR.NB_SNAPSHOTS);
    await this.imageSync.sync();
    const oldOffset = this.snapshotsOffset;
    const oldBytes = this.snapshotTableBytes;
    this.snapshotList = list;
    this.snapshotsOffset = off;
    this.snapshotTableBytes = table.length;
    this.fixedCache = null;
    if (oldBytes > 0) await this.refcounts.release(oldOffset, oldBytes);
  }

  /** Read and validate a snapshot's L1 table. */
  private async readSnapshotL1(sn: Qcow2Snapshot): Promise<{ raw: Buffer; offsets: number[] }> {
    const cs = this.geometry.clusterSize;
    const raw = Buffer.alloc(sn.l1Size * 8);
    await this.file.pread(raw, sn.l1TableOffset);
    const offsets: number[] = [];
    const fixed = this.fixedRanges().filter((r) => r.what !== 'L1 table');
    for (let i = 0; i < sn.l1Size; i++) {
      const e = decodeL1Entry(raw, i);
      if (e.l2Offset !== 0) validateTableCluster(`snapshot ${sn.id} L2 table ${i}`, e.l2Offset, cs, this.state.fileEnd, fixed);
      offsets.push(e.l2Offset);
    }
    return { raw, offsets };
  }

  private async writeActiveL1IfChanged(changed: boolean): Promise<void> {
    if (changed) await this.file.pwrite(this.l1, this.l1TableOffset);
  }

  /** Create an internal snapshot of the current state, like `qemu-img snapshot -c`. */
  async createSnapshot(name: string): Promise<Qcow2Snapshot> {
    this.assertSnapshotsWritable();
    if (this.snapshotList.some((sn) => sn.name === name)) throw new UsageError(`qcow2: a snapshot named ${JSON.stringify(name)} already exists`);
    if (this.snapshotList.length >= 65535) throw new RequestError('ENOSPC', 'qcow2: too many snapshots');
    return this.exclusive(async () => {
      const cs = this.geometry.clusterSize;
      const l1Bytes = this.l1Offsets.length * 8;
      let l1Copy = 0;
      if (l1Bytes > 0) {
        l1Copy = await this.refcounts.allocate(Math.ceil(l1Bytes / cs));
        await this.extendFile();
        await this.file.pwrite(Buffer.from(this.l1.subarray(0, l1Bytes)), l1Copy);
      }
      // Every cluster the snapshot now shares gains a reference before anything points at it.
      await adjustTreeRefcounts(this.snapshotTarget(), this.l1Offsets, 1);
      await this.writeActiveL1IfChanged(await refreshCopiedFlags(this.snapshotTarget(), this.l1, this.l1Offsets));
      let maxId = 0;
      for (const sn of this.snapshotList) maxId = Math.max(maxId, Number.parseInt(sn.id, 10) || 0);
      const now = Date.now();
      const snap: Qcow2Snapshot = {
        l1TableOffset: l1Copy,
        l1Size: this.l1Offsets.length,
        id: String(maxId + 1),
        name,
        dateSec: Math.floor(now / 1000),
        dateNsec: (now % 1000) * 1_000_000,
        vmClockNsec: 0n,
        vmStateSize: 0,
        diskSizeBytes: this.sizeBytes,
        icount: -1n,
        extraData: snapshotExtraData(this.sizeBytes),
      };
      await this.writeSnapshotTable([...this.snapshotList, snap]);
      return snap;
    });
  }

  /** Delete an internal snapshot (by id, else by name), like `qemu-img snapshot -d`. */
  async deleteSnapshot(idOrName: string): Promise<void> {
    this.assertSnapshotsWritable();
    const sn = this.findSnapshot(idOrName);
    await this.exclusive(async () => {
      const { offsets } = await this.readSnapshotL1(sn);
      // The table stops naming the snapshot first; only then do its clusters lose references.
      await this.writeSnapshotTable(this.snapshotList.filter((x) => x !== sn));
      await adjustTreeRefcounts(this.snapshotTarget(), offsets, -1);
      if (sn.l1Size > 0) await this.refcounts.release(sn.l1TableOffset, sn.l1Size * 8);
      await this.writeActiveL1IfChanged(await refreshCopiedFlags(this.snapshotTarget(), this.l1, this.l1Offsets));
      await this.imageSync.sync();
    });
  }

  /** Revert the active state to a snapshot, like `qemu-img snapshot -a`. */
  async applySnapshot(idOrName: string): Promise<void> {
    this.assertSnapshotsWritable();
    const sn = this.findSnapshot(idOrName);
    const size = sn.diskSizeBytes ?? this.sizeBytes;
    await this.exclusive(async () => {
      const { raw, offsets } = await this.readSnapshotL1(sn);
      if (sn.l1Size > this.l1Offsets.length) await this.growL1(sn.l1Size);
      await adjustTreeRefcounts(this.snapshotTarget(), offsets, 1);
      const old = this.l1Offsets.slice();
      const l1 = Buffer.alloc(this.l1.length);
      raw.copy(l1);
      await this.file.pwrite(l1, this.l1TableOffset);
      await this.imageSync.sync();
      this.l1 = l1;
      this.l1Offsets = old.map((_, i) => (i < offsets.length ? offsets[i]! : 0));
      await adjustTreeRefcounts(this.snapshotTarget(), old, -1);
      await this.writeActiveL1IfChanged(await refreshCopiedFlags(this.snapshotTarget(), this.l1, this.l1Offsets));
      if (size !== this.sizeBytes) {
        const b = Buffer.alloc(8);
        writeU64(b, size, 0);
        await this.file.pwrite(b, 24);
        this.sizeBytes = size;
      }
      await this.imageSync.sync();
    });
  }

  /** Move the active L1 table to a larger copy (metadata lock held): written and flushed first. */
  private async growL1(needed: number): Promise<void> {
    const cs = this.geometry.clusterSize;
    const clusters = Math.ceil((needed * 8) / cs);
    const off = await this.refcounts.allocate(clusters);
    await this.extendFile();
    const l1 = Buffer.alloc(clusters * cs);
    this.l1.copy(l1);
    await this.file.pwrite(l1, off);
    await this.imageSync.sync();
    const hdr = Buffer.alloc(12);
    hdr.writeUInt32BE(needed, 0);
    writeU64(hdr, off, 4);
    await this.file.pwrite(hdr, QCOW2_HDR.L1_SIZE);
    await this.imageSync.sync();
    const oldOffset = this.l1TableOffset;
    const oldBytes = this.l1Offsets.length * 8;
    this.l1 = l1.subarray(0, needed * 8);
    this.l1Offsets = this.l1Offsets.concat(new Array<number>(needed - this.l1Offsets.length).fill(0));
    this.l1TableOffset = off;
    this.fixedCache = null;
    if (oldBytes > 0) await this.refcounts.release(oldOffset, oldBytes);
  }

  /**
   * Grow the virtual disk to `newSizeBytes` (rounded up to 512 like QEMU). A larger L1 table is
   * written and flushed before the header points at it; the old one is freed afterwards.
   */
  async resize(newSizeBytes: number): Promise<void> {
    this.assertWritable();
    if (this.servedSnapshot !== null) throw new UsageError('qcow2: cannot resize a snapshot');
    if (!Number.isSafeInteger(newSizeBytes) || newSizeBytes < 0) throw new UsageError(`qcow2: invalid size ${newSizeBytes}`);
    const size = Math.ceil(newSizeBytes / 512) * 512;
    if (size < this.sizeBytes) throw new RequestError('ENOTSUP', 'qcow2: shrinking is not supported');
    const g = this.geometry;
    await this.quiesced(async () => {
        const needed = l1EntriesFor(size, g.clusterBits, g.l2EntryBytes);
        if (needed * 8 > QCOW2_MAX_L1_BYTES) throw new RequestError('EINVAL', `qcow2: size ${size} needs an L1 table above the 32 MiB limit`);
        if (needed > this.l1Offsets.length) await this.growL1(needed);
        const b = Buffer.alloc(8);
        writeU64(b, size, 0);
        await this.file.pwrite(b, 24);
        await this.imageSync.sync();
        this.sizeBytes = size;
      });
  }

  // ---- extents -------------------------------------------------------------------------------

  async extents(offset: number, length: number, opts: ExtentsOptions = {}): Promise<Extent[]> {
    this.checkRange(offset, length);
    return collectExtents(this.statusSource, offset, length, opts.one ?? false);
  }

  async allocationDepth(offset: number, length: number): Promise<DepthExtent[]> {
    this.checkRange(offset, length);
    return collectAllocationDepth(this.statusSource, offset, length);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // Let requests already in flight finish before the files go away.
    await this.clusterLock.run(0, Number.MAX_SAFE_INTEGER, true, () => this.metaLock.run(async () => undefined)).catch(() => undefined);
    try {
      if (!this.readOnly) {
        await this.metaLock.run(() => this.writeback());
        await this.syncData();
        // Clean shutdown: refcounts are complete, so a lazy-refcount image is consistent again.
        if (this.dirty && this.lazyRefcounts) await this.setIncompatibleBit(QCOW2_INCOMPAT.DIRTY, false);
      }
    } finally {
      await this.file.close();
      if (this.data !== this.file) await this.data.close();
      await this.backing?.close();
    }
  }
}

function validateTableCluster(what: string, offset: number, cs: number, fileSize: number, fixed: readonly Range[]): void {
  if (offset % cs !== 0) throw new CorruptImageError(`qcow2: ${what} at ${offset} is not cluster aligned`);
  if (offset + cs > fileSize) throw new CorruptImageError(`qcow2: ${what} at ${offset} is past end of file`);
  for (const r of fixed) {
    if (offset < r.end && r.start < offset + cs) throw new CorruptImageError(`qcow2: ${what} at ${offset} overlaps the ${r.what}`);
  }
}

/** Open a qcow2 image on an already opened host file. */
export function openQcow2(file: HostFile, opts: Qcow2OpenOptions = {}): Promise<Qcow2Device> {
  return Qcow2Device.open(file, opts);
}

/** Encode a compressed cluster descriptor: byte offset, then extra 512-byte sectors, bit 62. */
function encodeCompressedEntry(g: Qcow2Geometry, table: Buffer, index: number, hostOffset: number, bytes: number): void {
  const x = BigInt(62 - (g.clusterBits - 8));
  const extraSectors = BigInt(Math.floor((hostOffset + bytes - 1) / 512) - Math.floor(hostOffset / 512));
  const v = (1n << 62n) | (extraSectors << x) | BigInt(hostOffset);
  const pos = index * g.l2EntryBytes;
  table.writeBigUInt64BE(v, pos);
  if (g.extL2) table.writeBigUInt64BE(0n, pos + 8);
}

/** Size of the image file: fstat for regular files, BLKGETSIZE64 for block devices. */
export async function hostFileSize(file: HostFile): Promise<number> {
  return file.isBlockDevice ? blockDeviceSize(file.fd) : file.size();
}
