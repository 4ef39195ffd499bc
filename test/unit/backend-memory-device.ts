// An in-memory BlockDevice for backend and filter tests: configurable capabilities and
// optional methods, and a log of calls so tests can see what the layer above emulated.

import { DEFAULT_BLOCK_SIZES, type BlockDevice, type BlockSizes, type Capabilities, type Extent, type WriteOptions, type ZeroOptions } from '../../src/block/device.js';
import { RequestError } from '../../src/errors.js';

export interface MemoryDeviceOptions {
  readonly caps?: Partial<Capabilities>;
  readonly sizes?: Partial<BlockSizes>;
  /** Methods to leave out, to see the layer above emulate them. */
  readonly without?: ReadonlyArray<'pwrite' | 'flush' | 'trim' | 'zero' | 'extents' | 'cache'>;
  /** zero() throws ENOTSUP (a layer that finds out late it cannot zero). */
  readonly zeroNotSupported?: boolean;
  readonly extents?: (offset: number, length: number) => Extent[];
}

export class MemoryDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly data: Buffer;
  readonly calls: string[] = [];
  closed = 0;
  private readonly caps: Capabilities;
  private readonly sizes: BlockSizes;
  private readonly opts: MemoryDeviceOptions;

  constructor(sizeOrData: number | Buffer, opts: MemoryDeviceOptions = {}) {
    this.data = typeof sizeOrData === 'number' ? Buffer.alloc(sizeOrData) : sizeOrData;
    this.sizeBytes = this.data.length;
    this.opts = opts;
    this.caps = {
      writable: true,
      flush: true,
      fua: false,
      trim: true,
      zero: true,
      fastZero: true,
      extents: true,
      allocationDepth: false,
      cache: false,
      multiConn: true,
      rotational: false,
      ...opts.caps,
    };
    this.sizes = { ...DEFAULT_BLOCK_SIZES, ...opts.sizes };
    for (const m of opts.without ?? []) (this as Record<string, unknown>)[m] = undefined;
  }

  capabilities(): Capabilities {
    return this.caps;
  }

  blockSizes(): BlockSizes {
    return this.sizes;
  }

  private bounds(offset: number, length: number): void {
    if (offset < 0 || offset + length > this.sizeBytes) throw new Error(`memory device: out of range ${offset}+${length}`);
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    this.bounds(offset, buf.length);
    this.calls.push(`pread ${offset} ${buf.length}`);
    this.data.copy(buf, 0, offset, offset + buf.length);
  }

  async pwrite?(buf: Buffer, offset: number, opts?: WriteOptions): Promise<void> {
    this.bounds(offset, buf.length);
    this.calls.push(`pwrite ${offset} ${buf.length}${opts?.fua ? ' fua' : ''}`);
    buf.copy(this.data, offset);
  }

  async flush?(): Promise<void> {
    this.calls.push('flush');
  }

  async trim?(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    this.bounds(offset, length);
    this.calls.push(`trim ${offset} ${length}${opts?.fua ? ' fua' : ''}`);
    this.data.fill(0, offset, offset + length);
  }

  async zero?(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.bounds(offset, length);
    this.calls.push(`zero ${offset} ${length}${opts?.mayTrim ? ' trim' : ''}${opts?.fast ? ' fast' : ''}${opts?.fua ? ' fua' : ''}`);
    if (this.opts.zeroNotSupported) throw new RequestError('ENOTSUP', 'memory device cannot zero');
    this.data.fill(0, offset, offset + length);
  }

  async extents?(offset: number, length: number): Promise<Extent[]> {
    this.calls.push(`extents ${offset} ${length}`);
    if (this.opts.extents) return this.opts.extents(offset, length);
    return [{ length, flags: 0 }];
  }

  async cache?(offset: number, length: number): Promise<void> {
    this.calls.push(`cache ${offset} ${length}`);
  }

  async close(): Promise<void> {
    this.closed++;
  }
}
