// The QED image driver (qed_spec.rst): reads through L1/L2 tables with the backing device for
// unallocated clusters, writes in place or by appending whole clusters at the end of the file,
// zero clusters (L2 entry 1), trim, growing resize, extents and allocation depth.
//
// Crash safety (metadata ordering, as QEMU's qed does it):
//   1. QED_F_NEED_CHECK is set and synced before the first metadata change;
//   2. new data clusters are written and synced before an L2 entry points at them;
//   3. a new L2 table is written and synced before the L1 entry points at it.
// A crash therefore leaves at worst clusters appended but unreferenced (leaks), which the check
// run on the next writable open truncates away. flush() and close() sync, then clear the bit.
//
// Concurrency: reads run freely; every mutation (write, zero, trim, resize, flush's header update)
// runs under one mutex, so two writers never allocate the same guest cluster twice and the file
// end only moves under the lock. A concurrent read sees either the old mapping or the new one,
// and the new one only after its data is durable.

import { readFromBacking } from '../../block/backing-read.js';
import type { BlockDevice, BlockSizes, Capabilities, DepthExtent, Extent, ExtentsOptions, WriteOptions, ZeroOptions } from '../../block/device.js';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../block/device.js';
import { writeZeros } from '../../block/zero-buffer.js';
import { CorruptImageError, RequestError, UnsupportedImageError, UsageError } from '../../errors.js';
import type { HostFile } from '../../io/host-file.js';
import { FileZeroing } from '../../io/file-zeroing.js';
import { TableCache } from '../qcow2/l2-cache.js';
import { Mutex } from '../qcow2/locks.js';
import { checkQed, type QedCheckResult } from './check.js';
import { encodeQedHeader, isValidImageSize, parseQedHeader, QED_F, QED_HEADER_BYTES, QED_ZERO_CLUSTER, type QedHeader } from './header.js';
import { isValidClusterOffset, isValidTableOffset, makeQedGeometry, readQedEntry, UNALLOCATED, writeQedEntry, ZERO, type QedClusterState, type QedGeometry } from './map.js';

export interface QedBackingRef {
  /** The name as recorded in the header. */
  readonly fileName: string;
  /** 'raw' when QED_F_BACKING_FORMAT_NO_PROBE is set, otherwise null (probe). */
  readonly format: string | null;
}

export interface QedOpenOptions {
  readonly readOnly?: boolean;
  /** Opens the backing file named in the header; the device closes what it returns. */
  readonly openBacking?: (ref: QedBackingRef) => Promise<BlockDevice>;
  /** Bytes of L2 tables kept in memory (default 8 MiB, at least two tables). */
  readonly tableCacheBytes?: number;
  /**
   * Do not open the backing file: unallocated clusters then read as zeros. For tools that never
   * read guest data through it (resize, check), so a missing backing file does not stop them.
   */
  readonly ignoreBacking?: boolean;
}

const DEFAULT_TABLE_CACHE_BYTES = 8 * 1024 * 1024;

/** One guest cluster touched by a write. */
interface WritePiece {
  readonly cluster: number;
  /** Byte range inside the cluster that the caller supplies. */
  readonly a: number;
  readonly b: number;
  readonly state: QedClusterState;
}

export class QedDevice implements BlockDevice {
  readonly readOnly: boolean;
  readonly geometry: QedGeometry;
  /** The name recorded in the header, or null. */
  readonly backingFileName: string | null;
  /** What the writable open's consistency check found, when it ran. */
  readonly checkResult: QedCheckResult | null;
  private header: QedHeader;
  private readonly file: HostFile;
  private readonly backing: BlockDevice | null;
  private readonly l1: Buffer;
  private readonly tables: TableCache;
  private readonly writeLock = new Mutex();
  /** Cluster-aligned end of the file: where the next cluster is appended. */
  private fileEnd: number;
  private closed = false;
  private readonly zeroing: FileZeroing;

  private constructor(init: {
    file: HostFile;
    header: QedHeader;
    readOnly: boolean;
    backing: BlockDevice | null;
    backingFileName: string | null;
    l1: Buffer;
    fileEnd: number;
    checkResult: QedCheckResult | null;
    tableCacheBytes: number;
  }) {
    this.file = init.file;
    this.zeroing = new FileZeroing(this.file);
    this.header = init.header;
    this.readOnly = init.readOnly;
    this.backing = init.backing;
    this.backingFileName = init.backingFileName;
    this.l1 = init.l1;
    this.fileEnd = init.fileEnd;
    this.checkResult = init.checkResult;
    this.geometry = makeQedGeometry(init.header.clusterSize, init.header.tableSize, init.header.headerSize);
    const tableBytes = this.geometry.tableBytes;
    this.tables = new TableCache(
      init.tableCacheBytes / tableBytes,
      async (off) => {
        const t = Buffer.allocUnsafe(tableBytes);
        await this.file.pread(t, off);
        return t;
      },
      (off, buf) => this.file.pwrite(buf, off),
    );
  }

  /**
   * Open a QED image on `file`; the device owns the file (and the backing device) from then on,
   * except when open throws: the caller still closes the file.
   */
  static async open(file: HostFile, opts: QedOpenOptions = {}): Promise<QedDevice> {
    const readOnly = opts.readOnly ?? file.readOnly;
    const fileSize = await file.size();
    const head = Buffer.alloc(QED_HEADER_BYTES);
    await file.pread(head, 0);
    let header = parseQedHeader(head, fileSize);
    const g = makeQedGeometry(header.clusterSize, header.tableSize, header.headerSize);

    let backingFileName: string | null = null;
    if (header.features & QED_F.BACKING_FILE) {
      const name = Buffer.alloc(header.backingFilenameSize);
      await file.pread(name, header.backingFilenameOffset);
      if (name.includes(0)) throw new CorruptImageError('qed: backing file name contains a NUL byte');
      backingFileName = name.toString('utf8');
    }

    const l1 = Buffer.allocUnsafe(g.tableBytes);
    await file.pread(l1, header.l1TableOffset);
    let fileEnd = Math.floor(fileSize / g.clusterSize) * g.clusterSize;

    let checkResult: QedCheckResult | null = null;
    if (!readOnly) {
      let changed = false;
      if (header.features & QED_F.NEED_CHECK) {
        // "A dirty image must be checked on open because its metadata may not be consistent."
        checkResult = await checkQed({ file, geometry: g, l1TableOffset: header.l1TableOffset, l1, fileSize, fix: true });
        if (checkResult.duplicateReferences > 0) {
          throw new CorruptImageError(`qed: image needs repair that cannot be done safely (${checkResult.problems.join('; ')}); open it read-only`);
        }
        fileEnd = checkResult.fileEnd;
        header = { ...header, features: header.features & ~QED_F.NEED_CHECK };
        changed = true;
      }
      // "An image with unknown autoclear_features bits enable can be opened safely after clearing the unknown bits."
      if (header.autoclearFeatures !== 0n) {
        header = { ...header, autoclearFeatures: 0n };
        changed = true;
      }
      if (changed) {
        await file.pwrite(encodeQedHeader(header), 0);
        await file.datasync();
      }
    }

    let backing: BlockDevice | null = null;
    if (backingFileName !== null && opts.ignoreBacking !== true) {
      if (!opts.openBacking) throw new UnsupportedImageError(`qed: image has backing file ${JSON.stringify(backingFileName)} but no way to open it was given`);
      const format = header.features & QED_F.BACKING_FORMAT_NO_PROBE ? 'raw' : null;
      backing = await opts.openBacking({ fileName: backingFileName, format });
    }
    return new QedDevice({
      file,
      header,
      readOnly,
      backing,
      backingFileName,
      l1,
      fileEnd,
      checkResult,
      tableCacheBytes: opts.tableCacheBytes ?? DEFAULT_TABLE_CACHE_BYTES,
    });
  }

  get sizeBytes(): number {
    return this.header.imageSize;
  }

  /**
   * The consistency check on demand (qemu-img check), read-only: nothing is repaired, the
   * caller's open decides that. Runs under the write lock so no allocation is half done.
   */
  async check(): Promise<QedCheckResult> {
    return this.writeLock.run(async () =>
      checkQed({ file: this.file, geometry: this.geometry, l1TableOffset: this.header.l1TableOffset, l1: Buffer.from(this.l1), fileSize: await this.file.size(), fix: false }),
    );
  }

  /** True while QED_F_NEED_CHECK is set in the on-disk header. */
  get needCheck(): boolean {
    return (this.header.features & QED_F.NEED_CHECK) !== 0;
  }

  capabilities(): Capabilities {
    const w = !this.readOnly;
    return { writable: w, flush: w, fua: false, trim: w, zero: w, fastZero: w, extents: true, allocationDepth: true, cache: false, multiConn: true, rotational: false };
  }

  blockSizes(): BlockSizes {
    return { minimum: 1, preferred: Math.min(this.geometry.clusterSize, 1 << 24), maximum: 32 * 1024 * 1024 };
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new RequestError('EINVAL', `qed: request [${offset}, +${length}) is outside the ${this.sizeBytes}-byte disk`);
    }
  }

  private assertWritable(): void {
    if (this.closed) throw new RequestError('ESHUTDOWN', 'qed: image is closed');
    if (this.readOnly) throw new RequestError('EPERM', 'qed: image is open read-only');
  }

  // ---- mapping -------------------------------------------------------------------------------

  private async lookup(cluster: number): Promise<QedClusterState> {
    const g = this.geometry;
    const l1Index = Math.floor(cluster / g.tableEntries);
    const l2Offset = readQedEntry(this.l1, l1Index);
    if (l2Offset === 0) return UNALLOCATED;
    if (!isValidTableOffset(g, l2Offset, this.fileEnd)) throw new CorruptImageError(`qed: L1[${l1Index}] = ${l2Offset} is not a valid L2 table offset`);
    const table = await this.tables.get(l2Offset);
    const l2Index = cluster % g.tableEntries;
    const e = readQedEntry(table, l2Index);
    if (e === 0) return UNALLOCATED;
    if (e === QED_ZERO_CLUSTER) return ZERO;
    if (!isValidClusterOffset(g, e, this.fileEnd)) throw new CorruptImageError(`qed: L2[${l1Index}][${l2Index}] = ${e} is not a valid data cluster offset`);
    return { kind: 'data', hostOffset: e };
  }

  // ---- reads ---------------------------------------------------------------------------------

  async pread(buf: Buffer, offset: number): Promise<void> {
    this.checkRange(offset, buf.length);
    const cs = this.geometry.clusterSize;
    const pending: Promise<void>[] = [];
    let runHost = -1;
    let runBuf = 0;
    let runLen = 0;
    const flushRun = (): void => {
      if (runLen > 0) pending.push(this.file.pread(buf.subarray(runBuf, runBuf + runLen), runHost));
      runLen = 0;
    };
    for (let done = 0; done < buf.length; ) {
      const pos = offset + done;
      const cluster = Math.floor(pos / cs);
      const inCluster = pos - cluster * cs;
      const n = Math.min(cs - inCluster, buf.length - done);
      let s: QedClusterState;
      try {
        s = await this.lookup(cluster);
      } catch (e) {
        // Reads already issued must settle before the error leaves (no stray rejection).
        flushRun();
        await Promise.allSettled(pending);
        throw e;
      }
      if (s.kind === 'data') {
        const host = s.hostOffset + inCluster;
        if (runLen > 0 && runHost + runLen === host) runLen += n;
        else {
          flushRun();
          runHost = host;
          runBuf = done;
          runLen = n;
        }
      } else {
        flushRun();
        if (s.kind === 'zero') buf.fill(0, done, done + n);
        else pending.push(this.readBacking(buf.subarray(done, done + n), pos));
      }
      done += n;
    }
    flushRun();
    await Promise.all(pending);
  }

  /** "reads of unallocated areas beyond the end of the backing file produce zeroes." */
  private readBacking(buf: Buffer, offset: number): Promise<void> {
    return readFromBacking(this.backing, buf, offset);
  }

  // ---- writes --------------------------------------------------------------------------------

  async pwrite(buf: Buffer, offset: number, opts: WriteOptions = {}): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, buf.length);
    if (buf.length === 0) return;
    await this.writeLock.run(() => this.writeLocked(buf, offset));
    if (opts.fua) await this.syncAndClean();
  }

  private async writeLocked(buf: Buffer, offset: number): Promise<void> {
    const cs = this.geometry.clusterSize;
    // Every mapping is looked up (and validated) before anything is written.
    const pieces: WritePiece[] = [];
    for (let done = 0; done < buf.length; ) {
      const pos = offset + done;
      const cluster = Math.floor(pos / cs);
      const a = pos - cluster * cs;
      const b = Math.min(cs, a + buf.length - done);
      pieces.push({ cluster, a, b, state: await this.lookup(cluster) });
      done += b - a;
    }
    const alloc: WritePiece[] = [];
    const inPlace: Promise<void>[] = [];
    for (const p of pieces) {
      const src = buf.subarray(p.cluster * cs + p.a - offset, p.cluster * cs + p.b - offset);
      if (p.state.kind === 'data') inPlace.push(this.file.pwrite(src, p.state.hostOffset + p.a));
      else alloc.push(p);
    }
    await Promise.all(inPlace);
    if (alloc.length === 0) return;

    // New clusters are whole: the caller's bytes over backing data (unallocated) or zeros.
    const data = Buffer.alloc(alloc.length * cs);
    await Promise.all(
      alloc.map(async (p, i) => {
        const c = data.subarray(i * cs, (i + 1) * cs);
        if ((p.a > 0 || p.b < cs) && p.state.kind === 'unallocated') await this.readBacking(c, p.cluster * cs);
        buf.copy(c, p.a, p.cluster * cs + p.a - offset, p.cluster * cs + p.b - offset);
      }),
    );
    await this.markNeedCheck();
    const base = this.appendClusters(alloc.length);
    await this.file.pwrite(data, base);
    // Data durable before any L2 entry points at it.
    await this.file.datasync();
    await this.link(alloc.map((p, i) => ({ cluster: p.cluster, value: base + i * cs })));
  }

  /** Reserve `n` clusters at the end of the file; returns the first one's offset. */
  private appendClusters(n: number): number {
    const at = this.fileEnd;
    const end = at + n * this.geometry.clusterSize;
    if (!Number.isSafeInteger(end)) throw new RequestError('ENOSPC', 'qed: image file would exceed 2^53 bytes');
    this.fileEnd = end;
    return at;
  }

  /**
   * Point L2 entries at new values. Existing tables are updated in place (the entries' byte
   * range); missing tables are appended, synced, and only then linked from L1.
   */
  private async link(updates: readonly { cluster: number; value: number }[]): Promise<void> {
    const g = this.geometry;
    const byTable = new Map<number, { cluster: number; value: number }[]>();
    for (const u of updates) {
      const i = Math.floor(u.cluster / g.tableEntries);
      let list = byTable.get(i);
      if (!list) byTable.set(i, (list = []));
      list.push(u);
    }
    const existing: Promise<void>[] = [];
    const fresh: { l1Index: number; offset: number }[] = [];
    for (const [l1Index, list] of byTable) {
      const l2Offset = readQedEntry(this.l1, l1Index);
      if (l2Offset !== 0) {
        if (!isValidTableOffset(g, l2Offset, this.fileEnd)) throw new CorruptImageError(`qed: L1[${l1Index}] = ${l2Offset} is not a valid L2 table offset`);
        const table = await this.tables.get(l2Offset);
        let lo = Infinity;
        let hi = -Infinity;
        for (const u of list) {
          const j = u.cluster % g.tableEntries;
          writeQedEntry(table, j, u.value);
          lo = Math.min(lo, j);
          hi = Math.max(hi, j);
        }
        existing.push(this.tables.write(l2Offset, table, { start: lo * 8, end: (hi + 1) * 8 }));
      } else {
        const table = Buffer.alloc(g.tableBytes);
        for (const u of list) writeQedEntry(table, u.cluster % g.tableEntries, u.value);
        const at = this.appendClusters(g.tableBytes / g.clusterSize);
        existing.push(this.tables.write(at, table));
        fresh.push({ l1Index, offset: at });
      }
    }
    await Promise.all(existing);
    if (fresh.length === 0) return;
    // The new tables are durable before L1 points at them.
    await this.file.datasync();
    let lo = Infinity;
    let hi = -Infinity;
    for (const f of fresh) {
      writeQedEntry(this.l1, f.l1Index, f.offset);
      lo = Math.min(lo, f.l1Index);
      hi = Math.max(hi, f.l1Index);
    }
    await this.file.pwrite(this.l1.subarray(lo * 8, (hi + 1) * 8), this.header.l1TableOffset + lo * 8);
  }

  /** Set QED_F_NEED_CHECK, durably, before the first metadata change since the last clean point. */
  private async markNeedCheck(): Promise<void> {
    if (this.header.features & QED_F.NEED_CHECK) return;
    await this.writeHeader({ ...this.header, features: this.header.features | QED_F.NEED_CHECK });
    await this.file.datasync();
  }

  private async writeHeader(h: QedHeader): Promise<void> {
    await this.file.pwrite(encodeQedHeader(h), 0);
    this.header = h;
  }

  // ---- zero, trim ----------------------------------------------------------------------------

  async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, length);
    if (length === 0) return;
    const cs = this.geometry.clusterSize;
    const end = offset + length;
    // A fast zero may not write data: partial clusters would need it.
    if (opts.fast && (offset % cs !== 0 || (end % cs !== 0 && end !== this.sizeBytes))) {
      throw new RequestError('ENOTSUP', `qed: zeroing [${offset}, +${length}) fast needs whole ${cs}-byte clusters`);
    }
    await this.writeLock.run(async () => {
      const first = Math.ceil(offset / cs) * cs;
      // The last cluster counts as whole when the range reaches the end of the disk.
      const last = end === this.sizeBytes ? Math.ceil(end / cs) * cs : Math.floor(end / cs) * cs;
      if (first >= last) {
        await this.zeroPartial(offset, end);
        return;
      }
      if (offset < first) await this.zeroPartial(offset, first);
      await this.zeroWholeClusters(first / cs, last / cs, opts.mayTrim === true, opts.fast === true);
      if (last < end) await this.zeroPartial(last, end);
    });
    if (opts.fua) await this.syncAndClean();
  }

  /**
   * Trim: whole clusters in the range read as zeros afterwards (their host space is punched
   * when the filesystem allows); partial clusters at the edges are left as they are.
   */
  async trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, length);
    const cs = this.geometry.clusterSize;
    const end = offset + length;
    const first = Math.ceil(offset / cs);
    const last = end === this.sizeBytes ? Math.ceil(end / cs) : Math.floor(end / cs);
    if (first >= last) return;
    await this.writeLock.run(() => this.zeroWholeClusters(first, last, true, false));
    if (opts.fua) await this.syncAndClean();
  }

  /** Zero parts of clusters in [from, to) by writing: nothing to do where they already read as zeros. */
  private async zeroPartial(from: number, to: number): Promise<void> {
    const cs = this.geometry.clusterSize;
    for (let pos = from; pos < to; ) {
      const next = Math.min(to, (Math.floor(pos / cs) + 1) * cs);
      const s = await this.lookup(Math.floor(pos / cs));
      if (s.kind === 'data' || (s.kind === 'unallocated' && (await this.backingMayHaveData(pos, next)))) {
        await writeZeros((b, o) => this.writeLocked(b, o), pos, next - pos);
      }
      pos = next;
    }
  }

  private async backingMayHaveData(from: number, to: number): Promise<boolean> {
    const b = this.backing;
    return b !== null && from < b.sizeBytes && to > from;
  }

  /** Make guest clusters [first, last) read as zeros. */
  private async zeroWholeClusters(first: number, last: number, punch: boolean, fast: boolean): Promise<void> {
    const cs = this.geometry.clusterSize;
    const toZeroCluster: { cluster: number; value: number }[] = [];
    for (let c = first; c < last; c++) {
      const s = await this.lookup(c);
      if (s.kind === 'zero') continue;
      if (s.kind === 'data') {
        // Keep the mapping (no leak), drop the contents.
        await this.zeroHost(s.hostOffset, cs, punch, fast);
        continue;
      }
      if (await this.backingMayHaveData(c * cs, (c + 1) * cs)) toZeroCluster.push({ cluster: c, value: QED_ZERO_CLUSTER });
    }
    if (toZeroCluster.length === 0) return;
    await this.markNeedCheck();
    await this.link(toZeroCluster);
  }

  private zeroHost(hostOffset: number, length: number, punch: boolean, fast: boolean): Promise<void> {
    return this.zeroing.zero(hostOffset, length, { mayPunch: punch, fast, what: 'qed' });
  }

  // ---- flush, resize, close ------------------------------------------------------------------

  async flush(): Promise<void> {
    if (this.readOnly || this.closed) return;
    await this.syncAndClean();
  }

  /** Sync everything, then clear QED_F_NEED_CHECK: the metadata on disk is consistent. */
  private async syncAndClean(): Promise<void> {
    await this.writeLock.run(async () => {
      await this.file.datasync();
      if (!(this.header.features & QED_F.NEED_CHECK)) return;
      await this.writeHeader({ ...this.header, features: this.header.features & ~QED_F.NEED_CHECK });
      await this.file.datasync();
    });
  }

  /** Grow the virtual disk to `newSize` bytes (QED cannot shrink). */
  async resize(newSize: number): Promise<void> {
    this.assertWritable();
    const h = this.header;
    if (!Number.isSafeInteger(newSize) || newSize < h.imageSize) throw new UsageError(`qed: cannot resize from ${h.imageSize} to ${newSize} bytes: QED images only grow`);
    if (!isValidImageSize(newSize, h.clusterSize, h.tableSize)) throw new UsageError(`qed: size ${newSize} is not a multiple of 512 within what the L1 table maps`);
    await this.writeLock.run(async () => {
      await this.writeHeader({ ...this.header, imageSize: newSize });
      await this.file.datasync();
    });
  }

  // ---- status ----------------------------------------------------------------------------------

  /** Visit runs of equal cluster kind; `fn` returns false to stop. */
  private async walk(offset: number, length: number, fn: (pos: number, n: number, kind: QedClusterState['kind']) => Promise<boolean>): Promise<void> {
    const cs = this.geometry.clusterSize;
    const end = offset + length;
    let runStart = offset;
    let runKind: QedClusterState['kind'] | null = null;
    for (let pos = offset; pos < end; ) {
      const cluster = Math.floor(pos / cs);
      let next = Math.min(end, (cluster + 1) * cs);
      let kind: QedClusterState['kind'];
      const l1Index = Math.floor(cluster / this.geometry.tableEntries);
      if (readQedEntry(this.l1, l1Index) === 0) {
        // No L2 table: its whole span is unallocated, without a lookup per cluster.
        kind = 'unallocated';
        next = Math.min(end, (l1Index + 1) * this.geometry.l2SpanBytes);
      } else kind = (await this.lookup(cluster)).kind;
      if (kind !== runKind) {
        if (runKind !== null && !(await fn(runStart, pos - runStart, runKind))) return;
        runStart = pos;
        runKind = kind;
      }
      pos = next;
    }
    if (runKind !== null) await fn(runStart, end - runStart, runKind);
  }

  async extents(offset: number, length: number, opts: ExtentsOptions = {}): Promise<Extent[]> {
    this.checkRange(offset, length);
    const out: Extent[] = [];
    const push = (len: number, flags: number): void => {
      const lastE = out[out.length - 1];
      if (lastE && lastE.flags === flags) out[out.length - 1] = { length: lastE.length + len, flags };
      else out.push({ length: len, flags });
    };
    await this.walk(offset, length, async (pos, n, kind) => {
      if (kind === 'data') push(n, 0);
      else if (kind === 'zero') push(n, EXTENT_HOLE | EXTENT_ZERO);
      else await this.backingExtents(pos, n, push);
      return !(opts.one && out.length > 1);
    });
    if (opts.one && out.length > 1) out.length = 1;
    return out;
  }

  private async backingExtents(pos: number, n: number, push: (len: number, flags: number) => void): Promise<void> {
    const b = this.backing;
    const have = b === null ? 0 : Math.max(0, Math.min(n, b.sizeBytes - pos));
    if (have > 0) {
      if (b!.extents && b!.capabilities().extents) {
        for (let p = pos; p < pos + have; ) {
          const ext = await b!.extents(p, pos + have - p);
          if (ext.length === 0) {
            push(pos + have - p, 0);
            break;
          }
          for (const x of ext) {
            const len = Math.min(x.length, pos + have - p);
            if (len <= 0) break;
            push(len, x.flags);
            p += len;
          }
        }
      } else push(have, 0);
    }
    if (have < n) push(n - have, EXTENT_HOLE | EXTENT_ZERO);
  }

  async allocationDepth(offset: number, length: number): Promise<DepthExtent[]> {
    this.checkRange(offset, length);
    const out: DepthExtent[] = [];
    const push = (len: number, depth: number): void => {
      const lastE = out[out.length - 1];
      if (lastE && lastE.depth === depth) out[out.length - 1] = { length: lastE.length + len, depth };
      else out.push({ length: len, depth });
    };
    await this.walk(offset, length, async (pos, n, kind) => {
      if (kind !== 'unallocated') return (push(n, 1), true);
      const b = this.backing;
      const have = b === null ? 0 : Math.max(0, Math.min(n, b.sizeBytes - pos));
      if (have > 0) {
        if (b!.allocationDepth && b!.capabilities().allocationDepth) {
          for (let p = pos; p < pos + have; ) {
            const ext = await b!.allocationDepth(p, pos + have - p);
            if (ext.length === 0) {
              push(pos + have - p, 2);
              break;
            }
            for (const x of ext) {
              const len = Math.min(x.length, pos + have - p);
              if (len <= 0) break;
              push(len, x.depth === 0 ? 0 : x.depth + 1);
              p += len;
            }
          }
        } else push(have, 2);
      }
      if (have < n) push(n - have, 0);
      return true;
    });
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (!this.readOnly) await this.syncAndClean();
    } finally {
      this.closed = true;
      try {
        await this.file.close();
      } finally {
        await this.backing?.close();
      }
    }
  }
}
