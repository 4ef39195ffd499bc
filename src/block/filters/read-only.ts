// The read-only filter: the next device with every way to change it removed. Without
// pwrite/trim/zero the backend answers writes with EPERM, as nbd-proto.md asks for a
// read-only export.

import type { BlockDevice, BlockSizes, Capabilities, DepthExtent, Extent, ExtentsOptions, HostRun } from '../device.js';

class ReadOnlyDevice implements BlockDevice {
  readonly sizeBytes: number;
  private readonly next: BlockDevice;
  private readonly caps: Capabilities;

  constructor(next: BlockDevice) {
    this.next = next;
    this.sizeBytes = next.sizeBytes;
    this.caps = Object.freeze({
      ...next.capabilities(),
      writable: false,
      flush: false,
      fua: false,
      trim: false,
      zero: false,
      fastZero: false,
    });
    if (!next.extents) this.extents = undefined;
    if (!next.allocationDepth) this.allocationDepth = undefined;
    if (!next.cache) this.cache = undefined;
  }

  capabilities(): Capabilities {
    return this.caps;
  }

  blockSizes(): BlockSizes {
    return this.next.blockSizes();
  }

  pread(buf: Buffer, offset: number): Promise<void> {
    return this.next.pread(buf, offset);
  }

  readNow(buf: Buffer, offset: number): boolean {
    return this.next.readNow?.(buf, offset) ?? false;
  }

  hostRun(offset: number, length: number): HostRun | null {
    return this.next.hostRun?.(offset, length) ?? null;
  }

  extents?(offset: number, length: number, opts?: ExtentsOptions): Promise<Extent[]> {
    return this.next.extents!(offset, length, opts);
  }

  allocationDepth?(offset: number, length: number): Promise<DepthExtent[]> {
    return this.next.allocationDepth!(offset, length);
  }

  cache?(offset: number, length: number): Promise<void> {
    return this.next.cache!(offset, length);
  }

  close(): Promise<void> {
    return this.next.close();
  }
}

export function readOnlyFilter(next: BlockDevice): BlockDevice {
  return new ReadOnlyDevice(next);
}
