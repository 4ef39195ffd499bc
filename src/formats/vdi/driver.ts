// The VDI image driver (vdi-notes.md): static and dynamic images with 1 MiB blocks, reads
// through the block map, writes in place or by appending a whole new block.
//
// Allocation (section 4, with an order chosen for crash safety): the new block is written whole
// (the caller's bytes, zeros elsewhere) at index blocks_allocated and synced; then the header's
// blocks_allocated is raised and synced; then the map entry is written. A crash leaves at worst a
// block counted but unmapped — never a mapped block the next allocation would reuse. A writable
// open gives such tail blocks back (count lowered, file truncated), so qemu-img check is clean.
//
// Trim and zero never change the map (a discarded entry would leave blocks_allocated counting a
// block nothing references, which qemu-img check calls corruption): allocated ranges are zeroed
// in the host file, punched when deallocation is allowed; unallocated ranges already read as zero.

import type { BlockDevice, BlockSizes, Capabilities, DepthExtent, Extent, ExtentsOptions, WriteOptions, ZeroOptions } from '../../block/device.js';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../block/device.js';
import { CorruptImageError, RequestError } from '../../errors.js';
import type { HostFile } from '../../io/host-file.js';
import { FileZeroing } from '../../io/file-zeroing.js';
import { Mutex } from '../qcow2/locks.js';
import { parseVdiHeader, VDI_BLOCKS_ALLOCATED_OFFSET, VDI_DISCARDED, VDI_HEADER_BYTES, VDI_TYPE, type VdiHeader } from './header.js';
import { formatVdiUuid } from './uuid.js';

export interface VdiOpenOptions {
  readonly readOnly?: boolean;
}


export class VdiDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly header: VdiHeader;
  /** Blocks counted in blocks_allocated but never mapped that this (writable) open gave back. */
  readonly repairedLeakedBlocks: number;
  private readonly file: HostFile;
  /** The header as read, rewritten whole (QEMU does) with only blocks_allocated changed. */
  private readonly rawHeader: Buffer;
  /** blocks_in_image little-endian u32 entries. */
  private readonly map: Buffer;
  private blocksAllocated: number;
  private readonly writeLock = new Mutex();
  private closed = false;
  private readonly zeroing: FileZeroing;

  private constructor(file: HostFile, rawHeader: Buffer, header: VdiHeader, map: Buffer, readOnly: boolean, repairedLeakedBlocks: number) {
    this.file = file;
    this.zeroing = new FileZeroing(this.file);
    this.repairedLeakedBlocks = repairedLeakedBlocks;
    this.rawHeader = rawHeader;
    this.header = header;
    this.map = map;
    this.readOnly = readOnly;
    this.blocksAllocated = header.blocksAllocated;
    // "If disk_size is not a multiple of 512, QEMU accepts the image and rounds the size up."
    this.sizeBytes = Math.ceil(header.diskSize / 512) * 512;
  }

  /** Open a VDI image on `file`; the device owns the file from then on (not when open throws). */
  static async open(file: HostFile, opts: VdiOpenOptions = {}): Promise<VdiDevice> {
    const readOnly = opts.readOnly ?? file.readOnly;
    const fileSize = await file.size();
    const raw = Buffer.alloc(VDI_HEADER_BYTES);
    await file.pread(raw, 0);
    const h = parseVdiHeader(raw, fileSize);
    // The header check bounded the map by the file size, so this allocation is bounded too.
    const map = Buffer.allocUnsafe(h.blocksInImage * 4);
    await file.pread(map, h.offsetBmap);
    const { mapped, highest } = validateMap(h, map, fileSize);
    let header = h;
    let repaired = 0;
    if (!readOnly && highest < h.blocksAllocated && mapped === highest) {
      // Blocks counted but never mapped, all past the last mapped one: what a crash between the
      // header update and the map update leaves (see the allocation order above). qemu-img check
      // calls the count mismatch corruption; hand the indices back and drop the orphaned data.
      repaired = h.blocksAllocated - highest;
      header = { ...h, blocksAllocated: highest };
      raw.writeUInt32LE(highest, VDI_BLOCKS_ALLOCATED_OFFSET);
      await file.pwrite(raw, 0);
      await file.datasync();
      const end = h.offsetData + highest * h.blockSize;
      if (h.imageType === VDI_TYPE.DYNAMIC && fileSize > end) await file.truncate(end);
    }
    return new VdiDevice(file, raw, header, map, readOnly, repaired);
  }

  /**
   * qemu-img check's view (QEMU vdi_check): the open already refused entries out of range or
   * mapped twice, so what is left is blocks_allocated against the blocks the map uses.
   */
  check(): { readonly corruptions: number; readonly mappedBlocks: number; readonly blocksAllocated: number; readonly totalBlocks: number } {
    let mapped = 0;
    for (let i = 0; i < this.header.blocksInImage; i++) if (this.map.readUInt32LE(i * 4) < VDI_DISCARDED) mapped++;
    return { corruptions: mapped === this.blocksAllocated ? 0 : 1, mappedBlocks: mapped, blocksAllocated: this.blocksAllocated, totalBlocks: this.header.blocksInImage };
  }

  get isStatic(): boolean {
    return this.header.imageType === VDI_TYPE.STATIC;
  }

  get imageUuid(): string {
    return formatVdiUuid(this.header.uuidImage);
  }

  capabilities(): Capabilities {
    const w = !this.readOnly;
    return { writable: w, flush: w, fua: false, trim: w, zero: w, fastZero: w, extents: true, allocationDepth: true, cache: false, multiConn: true, rotational: false };
  }

  blockSizes(): BlockSizes {
    return { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new RequestError('EINVAL', `vdi: request [${offset}, +${length}) is outside the ${this.sizeBytes}-byte disk`);
    }
  }

  private assertWritable(): void {
    if (this.closed) throw new RequestError('ESHUTDOWN', 'vdi: image is closed');
    if (this.readOnly) throw new RequestError('EPERM', 'vdi: image is open read-only');
  }

  /** Host offset of block `i`, or -1 when it is unallocated or discarded. */
  private blockHost(i: number): number {
    const e = this.map.readUInt32LE(i * 4);
    if (e >= VDI_DISCARDED) return -1;
    return this.header.offsetData + e * this.header.blockSize;
  }

  /** Visit the block pieces of [offset, offset+length). */
  private *pieces(offset: number, length: number): Generator<{ block: number; inBlock: number; n: number; done: number }> {
    const bs = this.header.blockSize;
    for (let done = 0; done < length; ) {
      const pos = offset + done;
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const n = Math.min(bs - inBlock, length - done);
      yield { block, inBlock, n, done };
      done += n;
    }
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    this.checkRange(offset, buf.length);
    const pending: Promise<void>[] = [];
    for (const p of this.pieces(offset, buf.length)) {
      const host = this.blockHost(p.block);
      const dst = buf.subarray(p.done, p.done + p.n);
      if (host < 0) dst.fill(0);
      else pending.push(this.file.pread(dst, host + p.inBlock));
    }
    await Promise.all(pending);
  }

  async pwrite(buf: Buffer, offset: number, opts: WriteOptions = {}): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, buf.length);
    if (buf.length === 0) return;
    await this.writeLock.run(() => this.writeLocked(buf, offset));
    if (opts.fua) await this.file.datasync();
  }

  private async writeLocked(buf: Buffer, offset: number): Promise<void> {
    const bs = this.header.blockSize;
    const pieces = [...this.pieces(offset, buf.length)];
    const needed = pieces.filter((p) => this.blockHost(p.block) < 0).length;
    // qemu-img check requires every index below blocks_in_image; an image whose count already
    // reached it (blocks leaked by a crash) has no index left to hand out.
    if (this.blocksAllocated + needed > this.header.blocksInImage) {
      throw new RequestError('ENOSPC', `vdi: no free block index (blocks_allocated ${this.blocksAllocated} of ${this.header.blocksInImage})`);
    }
    const writes: Promise<void>[] = [];
    const fresh: number[] = [];
    for (const p of pieces) {
      const host = this.blockHost(p.block);
      const src = buf.subarray(p.done, p.done + p.n);
      if (host >= 0) {
        writes.push(this.file.pwrite(src, host + p.inBlock));
        continue;
      }
      // "QEMU writes the whole block. Bytes outside the range being written are filled with zeros."
      const index = this.blocksAllocated + fresh.length;
      const block = Buffer.alloc(bs);
      src.copy(block, p.inBlock);
      writes.push(this.file.pwrite(block, this.header.offsetData + index * bs));
      fresh.push(p.block);
    }
    await Promise.all(writes);
    if (fresh.length === 0) return;
    await this.file.datasync();
    const first = this.blocksAllocated;
    const count = first + fresh.length;
    this.rawHeader.writeUInt32LE(count, VDI_BLOCKS_ALLOCATED_OFFSET);
    await this.file.pwrite(this.rawHeader, 0);
    await this.file.datasync();
    this.blocksAllocated = count;
    fresh.forEach((b, k) => this.map.writeUInt32LE(first + k, b * 4));
    const lo = Math.min(...fresh);
    const hi = Math.max(...fresh);
    await this.file.pwrite(this.map.subarray(lo * 4, (hi + 1) * 4), this.header.offsetBmap + lo * 4);
  }

  async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, length);
    await this.writeLock.run(() => this.zeroLocked(offset, length, opts.mayTrim === true, opts.fast === true));
    if (opts.fua) await this.file.datasync();
  }

  async trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, length);
    await this.writeLock.run(() => this.zeroLocked(offset, length, true, false));
    if (opts.fua) await this.file.datasync();
  }

  private async zeroLocked(offset: number, length: number, punch: boolean, fast: boolean): Promise<void> {
    for (const p of this.pieces(offset, length)) {
      const host = this.blockHost(p.block);
      if (host >= 0) await this.zeroHost(host + p.inBlock, p.n, punch, fast);
    }
  }

  private zeroHost(hostOffset: number, length: number, punch: boolean, fast: boolean): Promise<void> {
    return this.zeroing.zero(hostOffset, length, { mayPunch: punch, fast, what: 'vdi' });
  }

  async flush(): Promise<void> {
    if (this.readOnly || this.closed) return;
    await this.writeLock.run(() => this.file.datasync());
  }

  async extents(offset: number, length: number, opts: ExtentsOptions = {}): Promise<Extent[]> {
    this.checkRange(offset, length);
    const out: Extent[] = [];
    for (const p of this.pieces(offset, length)) {
      // Unallocated and discarded blocks read as zeros (QEMU reports them as zero).
      const flags = this.blockHost(p.block) >= 0 ? 0 : EXTENT_HOLE | EXTENT_ZERO;
      const last = out[out.length - 1];
      if (last && last.flags === flags) out[out.length - 1] = { length: last.length + p.n, flags };
      else {
        if (opts.one && out.length === 1) break;
        out.push({ length: p.n, flags });
      }
    }
    return out;
  }

  async allocationDepth(offset: number, length: number): Promise<DepthExtent[]> {
    this.checkRange(offset, length);
    const out: DepthExtent[] = [];
    for (const p of this.pieces(offset, length)) {
      const depth = this.blockHost(p.block) >= 0 ? 1 : 0;
      const last = out[out.length - 1];
      if (last && last.depth === depth) out[out.length - 1] = { length: last.length + p.n, depth };
      else out.push({ length: p.n, depth });
    }
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (!this.readOnly) await this.writeLock.run(() => this.file.datasync());
    } finally {
      this.closed = true;
      await this.file.close();
    }
  }
}

/**
 * Every mapped block must lie inside the file and below blocks_allocated (the next allocation
 * goes there), and no two entries may share a block. Returns how many entries are mapped and
 * one past the highest block index they use.
 */
function validateMap(h: VdiHeader, map: Buffer, fileSize: number): { mapped: number; highest: number } {
  const seen = new Uint8Array(Math.ceil(h.blocksAllocated / 8));
  let mapped = 0;
  let highest = 0;
  for (let i = 0; i < h.blocksInImage; i++) {
    const e = map.readUInt32LE(i * 4);
    if (e >= VDI_DISCARDED) continue;
    if (e >= h.blocksAllocated) throw new CorruptImageError(`vdi: block map entry ${i} = ${e} is not below blocks_allocated (${h.blocksAllocated})`);
    const end = h.offsetData + (e + 1) * h.blockSize;
    if (end > fileSize) throw new CorruptImageError(`vdi: block map entry ${i} = ${e} points past the end of the ${fileSize}-byte file`);
    const bit = 1 << (e & 7);
    if (seen[e >>> 3]! & bit) throw new CorruptImageError(`vdi: block ${e} is mapped by more than one block map entry (entry ${i})`);
    seen[e >>> 3]! |= bit;
    mapped++;
    highest = Math.max(highest, e + 1);
  }
  return { mapped, highest };
}
