// The offset filter: exposes the window [offsetBytes, offsetBytes + sizeBytes) of the next
// device as a device of its own (nbdkit filters/offset/offset.c). It only remaps offsets and
// clips extents; a request outside the window is refused here too, so a window can never be
// used to reach bytes outside it even without a backend on top.

import type { BlockDevice, BlockSizes, Capabilities, DepthExtent, Extent, ExtentsOptions, HostRun, WriteOptions, ZeroOptions } from '../device.js';
import { RequestError, UsageError } from '../../errors.js';

export interface OffsetOptions {
  readonly offsetBytes: number;
  /** Defaults to the rest of the next device. */
  readonly sizeBytes?: number;
}

class OffsetDevice implements BlockDevice {
  readonly sizeBytes: number;
  private readonly next: BlockDevice;
  private readonly base: number;

  constructor(next: BlockDevice, base: number, sizeBytes: number) {
    this.next = next;
    this.base = base;
    this.sizeBytes = sizeBytes;
    if (!next.pwrite) this.pwrite = undefined;
    if (!next.flush) this.flush = undefined;
    if (!next.trim) this.trim = undefined;
    if (!next.zero) this.zero = undefined;
    if (!next.extents) this.extents = undefined;
    if (!next.allocationDepth) this.allocationDepth = undefined;
    if (!next.cache) this.cache = undefined;
  }

  capabilities(): Capabilities {
    return this.next.capabilities();
  }

  blockSizes(): BlockSizes {
    return this.next.blockSizes();
  }

  private outside(offset: number, length: number, write: boolean): RequestError | null {
    if (offset >= 0 && length >= 0 && offset + length <= this.sizeBytes) return null;
    return new RequestError(write ? 'ENOSPC' : 'EINVAL', `request [${offset}, +${length}) is outside the ${this.sizeBytes}-byte window`);
  }

  pread(buf: Buffer, offset: number): Promise<void> {
    const e = this.outside(offset, buf.length, false);
    return e ? Promise.reject(e) : this.next.pread(buf, offset + this.base);
  }

  readNow(buf: Buffer, offset: number): boolean {
    if (this.next.readNow === undefined || offset < 0 || offset + buf.length > this.sizeBytes) return false;
    return this.next.readNow(buf, offset + this.base);
  }

  hostRun(offset: number, length: number): HostRun | null {
    if (this.next.hostRun === undefined || offset < 0 || offset + length > this.sizeBytes) return null;
    return this.next.hostRun(offset + this.base, length);
  }

  hostWriteRun(offset: number, length: number): HostRun | null {
    if (this.next.hostWriteRun === undefined || offset < 0 || offset + length > this.sizeBytes) return null;
    return this.next.hostWriteRun(offset + this.base, length);
  }

  writeNow(buf: Buffer, offset: number): boolean {
    if (this.next.writeNow === undefined || offset < 0 || offset + buf.length > this.sizeBytes) return false;
    return this.next.writeNow(buf, offset + this.base);
  }

  pwrite?(buf: Buffer, offset: number, opts?: WriteOptions): Promise<void> {
    const e = this.outside(offset, buf.length, true);
    return e ? Promise.reject(e) : this.next.pwrite!(buf, offset + this.base, opts);
  }

  flush?(): Promise<void> {
    return this.next.flush!();
  }

  trim?(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    const e = this.outside(offset, length, false);
    return e ? Promise.reject(e) : this.next.trim!(offset + this.base, length, opts);
  }

  zero?(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    const e = this.outside(offset, length, true);
    return e ? Promise.reject(e) : this.next.zero!(offset + this.base, length, opts);
  }

  async extents?(offset: number, length: number, opts?: ExtentsOptions): Promise<Extent[]> {
    const e = this.outside(offset, length, false);
    if (e) throw e;
    return clip(await this.next.extents!(offset + this.base, length, opts), length);
  }

  async allocationDepth?(offset: number, length: number): Promise<DepthExtent[]> {
    const e = this.outside(offset, length, false);
    if (e) throw e;
    return clip(await this.next.allocationDepth!(offset + this.base, length), length);
  }

  cache?(offset: number, length: number): Promise<void> {
    const e = this.outside(offset, length, false);
    return e ? Promise.reject(e) : this.next.cache!(offset + this.base, length);
  }

  close(): Promise<void> {
    return this.next.close();
  }
}

/** Cut a list of consecutive extents so it covers at most `length` bytes (the window's end). */
function clip<T extends { readonly length: number }>(list: T[], length: number): T[] {
  let total = 0;
  for (let i = 0; i < list.length; i++) {
    const x = list[i]!;
    if (total + x.length >= length) {
      const out = list.slice(0, i + 1);
      if (total + x.length > length) out[i] = { ...x, length: length - total };
      return out;
    }
    total += x.length;
  }
  return list;
}

/** A window onto `next`. Throws UsageError when the window does not fit inside `next`. */
export function offsetFilter(next: BlockDevice, opts: OffsetOptions): BlockDevice {
  const { offsetBytes } = opts;
  const size = opts.sizeBytes ?? next.sizeBytes - offsetBytes;
  if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0 || !Number.isSafeInteger(size) || size < 0 || offsetBytes + size > next.sizeBytes) {
    throw new UsageError(`window at offset ${offsetBytes} of ${opts.sizeBytes ?? 'the rest'} bytes does not fit a ${next.sizeBytes}-byte device`);
  }
  const min = next.blockSizes().minimum;
  if (offsetBytes % min !== 0) {
    throw new UsageError(`window offset ${offsetBytes} is not a multiple of the device's minimum block size ${min}`);
  }
  return new OffsetDevice(next, offsetBytes, size);
}
