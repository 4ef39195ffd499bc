// The raw format: the image is the bytes of a host file or block device, read and written at
// the same offsets. Durability: flush = fdatasync; FUA is left to the backend, which flushes
// after the write (capabilities().fua is false). trim deallocates (punch hole / BLKDISCARD);
// zero uses fallocate or BLKZEROOUT and falls back to writing zeros unless `fast` is asked.

import { fstat as fstatCb, type Stats } from 'node:fs';
import { promisify } from 'node:util';
import {
  DEFAULT_BLOCK_SIZES,
  type BlockDevice,
  type BlockSizes,
  type Capabilities,
  type Extent,
  type ExtentsOptions,
  type HostRun,
  type ZeroOptions,
} from '../../block/device.js';
import { writeZeros } from '../../block/zero-buffer.js';
import { RequestError } from '../../errors.js';
import { FileZeroing } from '../../io/file-zeroing.js';
import { HostFile } from '../../io/host-file.js';
import { WriteCombiner } from '../../io/write-combiner.js';
import { isNotSupported } from '../../sys/errno.js';
import {
  adviseWillNeed,
  blockDeviceDiscard,
  blockDeviceLogicalSectorSize,
  blockDevicePhysicalSectorSize,
  blockDeviceSize,
  blockDeviceZeroOut,
} from '../../sys/libc.js';
import { NowaitReader } from '../../sys/nowait.js';
import { isRotational } from '../../sys/rotational.js';
import { PROBE_HEAD_BYTES } from '../magic.js';
import type { FormatDriver, OpenImageOptions } from '../registry.js';
import { seekExtents } from './extents.js';
import { assertStaysRaw, mergeHead } from './promotion-guard.js';

export interface RawOpenOptions {
  readonly readOnly?: boolean;
  /** The format was probed, not given: refuse writes that would make the image probe as another format. */
  readonly probedRaw?: boolean;
  /** Cache mode "unsafe": flushes return at once. */
  readonly cacheUnsafe?: boolean;
}

const fstat = promisify(fstatCb) as (fd: number) => Promise<Stats>;

export class RawDevice implements BlockDevice {
  readonly sizeBytes: number;
  private readonly file: HostFile;
  private readonly fd: number;
  private readonly caps: Capabilities;
  private readonly sizes: BlockSizes;
  private readonly guardHead: boolean;
  /** Logical sector size of a block device (1 for files): discard/zero-out must align to it. */
  private readonly sectorBytes: number;
  // Remembered refusals, so an unsupported fallocate mode costs one syscall, not one per request.
  private readonly zeroing: FileZeroing;
  private seekUnsupported = false;
  private readonly writes: WriteCombiner | null;
  private readonly nowait: NowaitReader;

  constructor(file: HostFile, sizeBytes: number, sectorBytes: number, physicalBytes: number, probedRaw: boolean, rotational = false) {
    this.file = file;
    this.fd = file.fd;
    this.zeroing = new FileZeroing(file);
    this.nowait = new NowaitReader(file.fd);
    // A block device does not serialise writes on an inode lock: let several run at once.
    // A file in memory is written at once (HostFile.inMemory): nothing to combine.
    this.writes = file.readOnly || file.inMemory ? null : new WriteCombiner(file.fd, file.isBlockDevice ? 16 : 1, (o, n) => file.reserve(o, n));
    this.sizeBytes = sizeBytes;
    this.sectorBytes = sectorBytes;
    const writable = !file.readOnly;
    this.guardHead = probedRaw && writable;
    this.caps = {
      writable,
      flush: writable,
      fua: false,
      trim: writable,
      zero: writable,
      fastZero: writable,
      extents: !file.isBlockDevice,
      allocationDepth: false,
      // NBD_CMD_CACHE becomes posix_fadvise(WILLNEED): the kernel reads ahead into the page cache.
      cache: true,
      multiConn: true,
      rotational,
    };
    // A probed raw image gets QEMU's 512-byte request alignment so that any write touching the
    // probe head carries all of it (see promotion-guard.ts).
    const minimum = this.guardHead ? PROBE_HEAD_BYTES : 1;
    const preferred = Math.max(DEFAULT_BLOCK_SIZES.preferred, physicalBytes, minimum);
    this.sizes = { minimum, preferred, maximum: DEFAULT_BLOCK_SIZES.maximum };
  }

  /** The open file, for a thread that opens the same image for itself. */
  get descriptor(): number {
    return this.fd;
  }

  capabilities(): Capabilities {
    return this.caps;
  }

  blockSizes(): BlockSizes {
    return this.sizes;
  }

  pread(buf: Buffer, offset: number): Promise<void> {
    return this.file.pread(buf, offset);
  }

  readNow(buf: Buffer, offset: number): boolean {
    return offset + buf.length <= this.sizeBytes && this.nowait.read(buf, offset);
  }

  hostRun(offset: number, length: number): HostRun | null {
    if (offset < 0 || offset + length > this.sizeBytes) return null;
    return { fd: this.fd, offset, length };
  }

  hostWriteRun(offset: number, length: number): HostRun | null {
    const f = this.file;
    // A block device keeps its several writes at once (WriteCombiner); the probe head is checked
    // before it is written (guardedWrite).
    if (f.readOnly || f.direct || f.isBlockDevice || offset < 0 || offset + length > this.sizeBytes) return null;
    if (this.guardHead && offset < PROBE_HEAD_BYTES) return null;
    return { fd: this.fd, offset, length };
  }

  /** Small writes into a file's page cache, here and now (BlockDevice.writeNow). */
  writeNow(buf: Buffer, offset: number): boolean {
    if (buf.length === 0 || this.hostWriteRun(offset, buf.length) === null || this.writes?.overlaps(offset, buf.length) === true) return false;
    try {
      this.file.pwriteNow(buf, offset);
    } catch {
      // Written in part or not at all: pwrite writes it again and reports the error.
      return false;
    }
    return true;
  }

  pwrite(buf: Buffer, offset: number): Promise<void> {
    if (offset + buf.length > this.sizeBytes) return Promise.reject(beyondEnd(offset, buf.length, this.sizeBytes));
    if (this.guardHead && offset < PROBE_HEAD_BYTES && buf.length > 0) return this.guardedWrite(buf, offset);
    return this.writes === null ? this.file.pwrite(buf, offset) : this.writes.write(buf, offset);
  }

  private async guardedWrite(buf: Buffer, offset: number): Promise<void> {
    const headLen = Math.min(PROBE_HEAD_BYTES, this.sizeBytes);
    if (offset === 0 && buf.length >= headLen) {
      assertStaysRaw(buf.subarray(0, headLen));
    } else {
      const current = Buffer.alloc(PROBE_HEAD_BYTES);
      await this.file.pread(current, 0);
      assertStaysRaw(mergeHead(current, buf, offset).subarray(0, headLen));
    }
    await this.file.pwrite(buf, offset);
  }

  flush(): Promise<void> {
    return this.file.datasync();
  }

  /**
   * Zeroing part of the head could complete a magic that ends in zero bytes ("QED\0"). The
   * backend's 512-byte alignment makes any such request zero the whole head (and every magic
   * has a nonzero byte); this check keeps the driver safe when used without it.
   */
  private async guardHeadZeroing(offset: number, length: number): Promise<void> {
    if (!this.guardHead || offset >= PROBE_HEAD_BYTES) return;
    const headLen = Math.min(PROBE_HEAD_BYTES, this.sizeBytes);
    if (offset === 0 && length >= headLen) return;
    const head = Buffer.alloc(PROBE_HEAD_BYTES);
    await this.file.pread(head, 0);
    head.fill(0, offset, Math.min(offset + length, PROBE_HEAD_BYTES));
    assertStaysRaw(head.subarray(0, headLen));
  }

  async trim(offset: number, length: number): Promise<void> {
    if (offset + length > this.sizeBytes) throw beyondEnd(offset, length, this.sizeBytes, 'EINVAL');
    if (length === 0) return;
    await this.guardHeadZeroing(offset, length);
    try {
      if (this.file.isBlockDevice) {
        // Trim is advisory (nbd-proto.md: the server "MAY round offset up and length down"),
        // and BLKDISCARD wants sector alignment.
        const start = alignUp(offset, this.sectorBytes);
        const end = alignDown(offset + length, this.sectorBytes);
        if (end > start) await blockDeviceDiscard(this.fd, start, end - start);
      } else {
        // A file system without hole punching simply keeps the data: trim is only a hint.
        await this.zeroing.punch(offset, length);
      }
    } catch (e) {
      if (!isNotSupported(e)) throw e;
    }
  }

  async zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    if (offset + length > this.sizeBytes) throw beyondEnd(offset, length, this.sizeBytes);
    if (length === 0) return;
    await this.guardHeadZeroing(offset, length);
    const fast = opts?.fast === true;
    const mayTrim = opts?.mayTrim === true;
    if (this.file.isBlockDevice ? await this.zeroBlockDevice(offset, length, mayTrim, fast) : await this.zeroFile(offset, length, mayTrim)) {
      return;
    }
    if (fast) throw new RequestError('ENOTSUP', `${this.file.path}: no fast way to zero ${length} bytes at ${offset}`);
    await writeZeros((b, o) => this.file.pwrite(b, o), offset, length);
  }

  /** True when a fallocate mode did the zeroing; false when only writing zeros is left. */
  private zeroFile(offset: number, length: number, mayTrim: boolean): Promise<boolean> {
    return this.zeroing.zeroWithoutWriting(offset, length, mayTrim);
  }

  private async zeroBlockDevice(offset: number, length: number, mayTrim: boolean, fast: boolean): Promise<boolean> {
    // Unaligned ranges cannot go to the device's zeroing commands.
    if (offset % this.sectorBytes !== 0 || length % this.sectorBytes !== 0) return false;
    // On a block device, PUNCH_HOLE is "write zeroes, may unmap, never fall back to writing":
    // exactly a fast zero.
    if (mayTrim && (await this.zeroing.punch(offset, length))) return true;
    // BLKZEROOUT may silently fall back to writing zeros in the kernel, so it is not "fast".
    if (fast) return false;
    try {
      await blockDeviceZeroOut(this.fd, offset, length);
      return true;
    } catch (e) {
      if (!isNotSupported(e)) throw e;
      return false;
    }
  }

  async extents(offset: number, length: number, opts?: ExtentsOptions): Promise<Extent[]> {
    const end = Math.min(offset + length, this.sizeBytes);
    if (end <= offset) throw beyondEnd(offset, length, this.sizeBytes, 'EINVAL');
    if (!this.seekUnsupported && !this.file.isBlockDevice) {
      try {
        return seekExtents(this.fd, offset, end - offset, opts?.one === true);
      } catch (e) {
        // EINVAL (or ENOTSUP on some FUSE filesystems): no SEEK_DATA here; everything is data.
        if ((e as { code?: unknown }).code !== 'EINVAL' && !isNotSupported(e)) throw e;
        this.seekUnsupported = true;
      }
    }
    return [{ length: end - offset, flags: 0 }];
  }

  cache(offset: number, length: number): Promise<void> {
    return adviseWillNeed(this.fd, offset, length);
  }

  close(): Promise<void> {
    return this.file.close();
  }
}

function beyondEnd(offset: number, length: number, sizeBytes: number, errno: 'ENOSPC' | 'EINVAL' = 'ENOSPC'): RequestError {
  return new RequestError(errno, `request [${offset}, +${length}) is beyond the end of the image (${sizeBytes} bytes)`);
}

function alignUp(v: number, a: number): number {
  return Math.ceil(v / a) * a;
}

function alignDown(v: number, a: number): number {
  return Math.floor(v / a) * a;
}

/** Open a raw image (regular file or block device). */
export async function openRaw(path: string, opts: RawOpenOptions = {}): Promise<RawDevice> {
  const file = await HostFile.open(path, { readOnly: opts.readOnly ?? false, ignoreFlush: opts.cacheUnsafe === true });
  try {
    const probed = opts.probedRaw ?? false;
    const st = await fstat(file.fd);
    if (file.isBlockDevice) {
      const size = blockDeviceSize(file.fd);
      const logical = blockDeviceLogicalSectorSize(file.fd);
      const physical = blockDevicePhysicalSectorSize(file.fd);
      return new RawDevice(file, size, logical > 0 ? logical : 512, physical, probed, isRotational(st.rdev));
    }
    return new RawDevice(file, st.size, 1, 0, probed, isRotational(st.dev));
  } catch (e) {
    await file.close();
    throw e;
  }
}

/** Raw's registry entry: matches anything, so probing consults it last. */
export const rawFormat: FormatDriver = {
  name: 'raw',
  probe: () => true,
  open: (path: string, opts: OpenImageOptions) => openRaw(path, { readOnly: opts.readOnly, probedRaw: opts.probed === true, cacheUnsafe: opts.cacheUnsafe === true }),
};
