// The backend wrapper: sits between the NBD server (or kernel attach, or a CLI tool) and the
// top layer of a device stack. It validates every request exactly once and emulates what the
// layer lacks, after nbdkit's server/backend.c and protocol.c (validate_request):
//
//   order of checks     range -> alignment -> payload size -> writable -> capability/flags
//   out of range        read/trim/cache/block-status EINVAL, write/write-zeroes ENOSPC
//                       (nbd-proto.md "Error values": "The server SHOULD return NBD_ENOSPC if it
//                       receives a write request including one or more sectors beyond the size
//                       of the device ... NBD_EINVAL if it receives a read or trim request
//                       including one or more sectors beyond the size of the device")
//   alignment           offset and length multiples of blockSizes().minimum, else EINVAL ("if a
//                       read or write request is not aligned to advertised minimum block
//                       sizes"); a request ending exactly at an unaligned export end is allowed
//                       so the tail stays reachable
//   payload size        read/write longer than blockSizes().maximum: EINVAL (the client "MUST
//                       NOT request a length larger than the maximum payload size")
//   read-only           write/trim/write-zeroes EPERM ("SHOULD return NBD_EPERM if it receives a
//                       write or trim request on a read-only export")
//   not advertised      trim, FUA, fast zero, when the layer cannot: EINVAL ("SHOULD return
//                       NBD_EINVAL if it receives a request with a flag not explicitly documented
//                       as applicable")
//   zero length         read/write/trim/zero/cache: a no-op success (the spec leaves it
//                       unspecified but says not to disconnect); block status and allocation
//                       depth: EINVAL, since a reply must hold a descriptor of nonzero length
//
// Emulation: write-zeroes by writing from one shared 1 MiB zero buffer, sequentially, unless
// `fast` (then ENOTSUP: "MUST fail quickly with NBD_ENOTSUP unless the request can be serviced
// in less time than a corresponding NBD_CMD_WRITE"); FUA by flush after the operation; extents
// as one data extent; allocation depth as depth 1; cache as read-and-discard.
//
// capabilities() is what the server advertises: writable -> !NBD_FLAG_READ_ONLY,
// flush -> SEND_FLUSH, fua -> SEND_FUA, trim -> SEND_TRIM, zero -> SEND_WRITE_ZEROES,
// fastZero -> SEND_FAST_ZERO, cache -> SEND_CACHE, multiConn -> CAN_MULTI_CONN,
// rotational -> ROTATIONAL.

import {
  EXTENT_HOLE,
  EXTENT_ZERO,
  type BlockDevice,
  type BlockSizes,
  type Capabilities,
  type DepthExtent,
  type Extent,
  type ExtentsOptions,
  type HostRun,
  type WriteOptions,
  type ZeroOptions,
} from './device.js';
import { writeZeros, ZERO_BUFFER_BYTES } from './zero-buffer.js';
import { ImgbdError, RequestError, toNbdErrno, type NbdErrno } from '../errors.js';

export interface BackendOptions {
  /** Export read-only even if the layer is writable (qemu-nbd -r, nbdkit -r). */
  readonly readOnly?: boolean;
}

/** NBD: "a server SHOULD NOT send more than 2^20 status descriptors in a single chunk". */
export const MAX_EXTENTS = 1 << 20;

const ALLOCATION_FLAGS = EXTENT_HOLE | EXTENT_ZERO;
const RESOLVED: Promise<void> = Promise.resolve();

/** Options handed down for a zero request, indexed by mayTrim | fast << 1 | fua << 2: no allocation per request. */
const ZERO_OPTS: readonly ZeroOptions[] = Array.from({ length: 8 }, (_, i) =>
  Object.freeze({ mayTrim: (i & 1) !== 0, fast: (i & 2) !== 0, fua: (i & 4) !== 0 }),
);

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

function checkBlockSizes(s: BlockSizes): void {
  const ok =
    isPowerOfTwo(s.minimum) &&
    s.minimum <= 65536 &&
    isPowerOfTwo(s.preferred) &&
    s.preferred >= s.minimum &&
    Number.isSafeInteger(s.maximum) &&
    s.maximum >= s.minimum &&
    s.maximum % s.minimum === 0;
  if (!ok) throw new ImgbdError('ERR_BLOCK_SIZES', `invalid block sizes from device: ${JSON.stringify(s)}`);
}

function reqError(errno: NbdErrno, what: string, offset: number, length: number, why: string): RequestError {
  return new RequestError(errno, `${what} at offset ${offset}, length ${length}: ${why}`);
}

export class Backend implements BlockDevice {
  readonly sizeBytes: number;
  readonly next: BlockDevice;
  private readonly caps: Capabilities;
  private readonly sizes: BlockSizes;
  private readonly nativeFua: boolean;
  private readonly hasZero: boolean;
  private readonly nativeFastZero: boolean;
  private readonly nativeExtents: boolean;
  private readonly nativeCache: boolean;
  private readonly nativeDepth: boolean;
  private readonly nextFlush: boolean;
  private readonly zeroChunkBytes: number;
  private scratch: Buffer | undefined;
  private closed: Promise<void> | undefined;

  constructor(next: BlockDevice, opts: BackendOptions = {}) {
    if (!Number.isSafeInteger(next.sizeBytes) || next.sizeBytes < 0) {
      throw new ImgbdError('ERR_DEVICE_SIZE', `invalid device size ${next.sizeBytes}`);
    }
    this.next = next;
    this.sizeBytes = next.sizeBytes;
    const c = next.capabilities();
    const sizes = next.blockSizes();
    checkBlockSizes(sizes);
    this.sizes = sizes;
    const writable = c.writable && !opts.readOnly && typeof next.pwrite === 'function';
    this.nextFlush = c.flush && typeof next.flush === 'function';
    this.nativeFua = c.fua;
    // A layer's zero() is used whenever present; only `fast` needs it to be natively efficient.
    this.hasZero = typeof next.zero === 'function';
    this.nativeFastZero = this.hasZero && c.zero && c.fastZero;
    this.nativeExtents = c.extents && typeof next.extents === 'function';
    this.nativeCache = c.cache && typeof next.cache === 'function';
    this.nativeDepth = c.allocationDepth && typeof next.allocationDepth === 'function';
    const chunk = Math.min(ZERO_BUFFER_BYTES, sizes.maximum);
    this.zeroChunkBytes = chunk - (chunk % sizes.minimum);
    this.caps = Object.freeze({
      writable,
      // A writable layer with nothing to flush (memory) still takes a flush: it is a no-op.
      flush: writable || this.nextFlush,
      fua: writable,
      trim: writable && c.trim && typeof next.trim === 'function',
      zero: writable,
      // Always answerable: a fast "ENOTSUP" counts as fast (nbd-proto.md, WRITE_ZEROES).
      fastZero: writable,
      extents: true,
      allocationDepth: true,
      cache: true,
      multiConn: c.multiConn,
      rotational: c.rotational,
    });
  }

  /** The effective capabilities: what the server should advertise. */
  capabilities(): Capabilities {
    return this.caps;
  }

  blockSizes(): BlockSizes {
    return this.sizes;
  }

  // --- validation -------------------------------------------------------------------------

  /** Range and alignment; null when fine. `overErrno` is what out-of-range maps to. */
  private checkRange(what: string, offset: number, length: number, overErrno: NbdErrno): RequestError | null {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      return reqError('EINVAL', what, offset, length, 'offset and length must be non-negative integers');
    }
    const end = offset + length;
    if (end > this.sizeBytes) return reqError(overErrno, what, offset, length, `beyond the end of the export (${this.sizeBytes} bytes)`);
    const min = this.sizes.minimum;
    if (min > 1 && (offset % min !== 0 || (length % min !== 0 && end !== this.sizeBytes))) {
      return reqError('EINVAL', what, offset, length, `not aligned to the minimum block size ${min}`);
    }
    return null;
  }

  private checkMutation(what: string, offset: number, length: number, fua: boolean, overErrno: NbdErrno): RequestError | null {
    const e = this.checkRange(what, offset, length, overErrno);
    if (e) return e;
    if (!this.caps.writable) return reqError('EPERM', what, offset, length, 'the export is read-only');
    if (fua && !this.caps.fua) return reqError('EINVAL', what, offset, length, 'FUA is not supported');
    return null;
  }

  // --- data path --------------------------------------------------------------------------

  pread(buf: Buffer, offset: number): Promise<void> {
    const len = buf.length;
    const e = this.checkRange('read', offset, len, 'EINVAL');
    if (e) return Promise.reject(e);
    if (len > this.sizes.maximum) return Promise.reject(reqError('EINVAL', 'read', offset, len, `longer than the maximum payload ${this.sizes.maximum}`));
    if (len === 0) return RESOLVED;
    return this.next.pread(buf, offset);
  }

  /** The synchronous read fast path; any request pread would refuse goes to pread instead. */
  readNow(buf: Buffer, offset: number): boolean {
    const len = buf.length;
    if (this.next.readNow === undefined || len === 0 || len > this.sizes.maximum) return false;
    if (this.checkRange('read', offset, len, 'EINVAL') !== null) return false;
    return this.next.readNow(buf, offset);
  }

  hostRun(offset: number, length: number): HostRun | null {
    if (this.next.hostRun === undefined || length === 0 || length > this.sizes.maximum) return null;
    if (this.checkRange('read', offset, length, 'EINVAL') !== null) return null;
    return this.next.hostRun(offset, length);
  }

  /** Where a write may be spliced (BlockDevice.hostWriteRun); null for anything pwrite would refuse. */
  hostWriteRun(offset: number, length: number, opts?: WriteOptions): HostRun | null {
    if (this.next.hostWriteRun === undefined || length === 0 || length > this.sizes.maximum) return null;
    if (this.checkMutation('write', offset, length, opts?.fua === true, 'ENOSPC') !== null) return null;
    return this.next.hostWriteRun(offset, length);
  }

  /** The synchronous write fast path; FUA and anything pwrite would refuse go to pwrite instead. */
  writeNow(buf: Buffer, offset: number, opts?: WriteOptions): boolean {
    const len = buf.length;
    if (this.next.writeNow === undefined || opts?.fua === true || len === 0 || len > this.sizes.maximum) return false;
    if (this.checkMutation('write', offset, len, false, 'ENOSPC') !== null) return false;
    return this.next.writeNow(buf, offset);
  }

  pwrite(buf: Buffer, offset: number, opts?: WriteOptions): Promise<void> {
    const len = buf.length;
    const fua = opts?.fua === true;
    const e = this.checkMutation('write', offset, len, fua, 'ENOSPC');
    if (e) return Promise.reject(e);
    if (len > this.sizes.maximum) return Promise.reject(reqError('EINVAL', 'write', offset, len, `longer than the maximum payload ${this.sizes.maximum}`));
    if (len === 0) return RESOLVED;
    if (fua && !this.nativeFua) return this.writeThenFlush(buf, offset);
    return this.next.pwrite!(buf, offset, opts);
  }

  private async writeThenFlush(buf: Buffer, offset: number): Promise<void> {
    await this.next.pwrite!(buf, offset);
    await this.flushNext();
  }

  private flushNext(): Promise<void> {
    return this.nextFlush ? this.next.flush!() : RESOLVED;
  }

  flush(): Promise<void> {
    if (!this.caps.flush) return Promise.reject(new RequestError('EINVAL', 'flush: not supported by this export'));
    return this.flushNext();
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    const fua = opts?.fua === true;
    const e = this.checkMutation('trim', offset, length, fua, 'EINVAL');
    if (e) throw e;
    if (!this.caps.trim) throw reqError('EINVAL', 'trim', offset, length, 'trim is not supported by this export');
    if (length === 0) return;
    if (fua && !this.nativeFua) {
      await this.next.trim!(offset, length);
      await this.flushNext();
    } else {
      await this.next.trim!(offset, length, opts);
    }
  }

  async zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    const fua = opts?.fua === true;
    const fast = opts?.fast === true;
    const mayTrim = opts?.mayTrim === true;
    const e = this.checkMutation('write-zeroes', offset, length, fua, 'ENOSPC');
    if (e) throw e;
    if (fast && !this.caps.fastZero) throw reqError('EINVAL', 'write-zeroes', offset, length, 'fast zero is not supported');
    if (length === 0) return;
    const passFua = fua && this.nativeFua;
    if (this.hasZero && (!fast || this.nativeFastZero)) {
      try {
        await this.next.zero!(offset, length, ZERO_OPTS[(mayTrim ? 1 : 0) | (fast ? 2 : 0) | (passFua ? 4 : 0)]);
        if (fua && !passFua) await this.flushNext();
        return;
      } catch (err) {
        // A layer may discover only now that it cannot zero efficiently; unless the client
        // asked for fast, zeroing by writing is still correct.
        if (fast || toNbdErrno(err) !== 'ENOTSUP') throw err;
      }
    } else if (fast) {
      throw reqError('ENOTSUP', 'write-zeroes', offset, length, 'no fast zeroing here');
    }
    await writeZeros(this.writeNext, offset, length, this.zeroChunkBytes, this.sizes.minimum);
    if (fua) await this.flushNext();
  }

  private readonly writeNext = (buf: Buffer, offset: number): Promise<void> => this.next.pwrite!(buf, offset);

  // --- metadata ---------------------------------------------------------------------------

  async extents(offset: number, length: number, opts?: ExtentsOptions): Promise<Extent[]> {
    const e = this.checkRange('block-status', offset, length, 'EINVAL');
    if (e) throw e;
    if (length === 0) throw reqError('EINVAL', 'block-status', offset, length, 'zero length');
    if (!this.nativeExtents) return [{ length, flags: 0 }];
    const got = await this.next.extents!(offset, length, opts);
    return sanitizeExtents(got, length, opts?.one === true);
  }

  async allocationDepth(offset: number, length: number): Promise<DepthExtent[]> {
    const e = this.checkRange('allocation-depth', offset, length, 'EINVAL');
    if (e) throw e;
    if (length === 0) throw reqError('EINVAL', 'allocation-depth', offset, length, 'zero length');
    if (!this.nativeDepth) return [{ length, depth: 1 }];
    return sanitizeDepths(await this.next.allocationDepth!(offset, length), length);
  }

  async cache(offset: number, length: number): Promise<void> {
    const e = this.checkRange('cache', offset, length, 'EINVAL');
    if (e) throw e;
    if (length === 0) return;
    if (this.nativeCache) return this.next.cache!(offset, length);
    // Read and discard: bounded memory, one chunk in flight. Concurrent cache requests share
    // the scratch buffer; its contents are never looked at.
    const chunk = this.zeroChunkBytes;
    this.scratch ??= Buffer.allocUnsafe(chunk);
    const end = offset + length;
    for (let pos = offset; pos < end; pos += chunk) {
      const n = Math.min(chunk, end - pos);
      await this.next.pread(n === chunk ? this.scratch : this.scratch.subarray(0, n), pos);
    }
  }

  close(): Promise<void> {
    this.closed ??= this.next.close();
    return this.closed;
  }
}

/**
 * Check a layer's extents against NBD's rules and clip them to the request: at least one,
 * each of positive integer length, only base:allocation flags, no more than `length` in total
 * (REQ_ONE: exactly one). A layer that breaks the rules is a bug: EIO rather than a bad reply.
 */
export function sanitizeExtents(got: readonly Extent[], length: number, one: boolean): Extent[] {
  if (got.length === 0) throw new RequestError('EIO', 'block-status: the device returned no extents');
  const limit = one ? 1 : Math.min(got.length, MAX_EXTENTS);
  let total = 0;
  let clean = limit === got.length;
  let i = 0;
  for (; i < limit && total < length; i++) {
    const x = got[i]!;
    if (!Number.isSafeInteger(x.length) || x.length <= 0) {
      throw new RequestError('EIO', `block-status: the device returned an extent of length ${x.length}`);
    }
    if ((x.flags & ~ALLOCATION_FLAGS) !== 0 || total + x.length > length) clean = false;
    total += x.length;
  }
  if (clean && i === got.length) return got as Extent[];
  const out: Extent[] = [];
  let left = length;
  for (let j = 0; j < i; j++) {
    const x = got[j]!;
    const n = Math.min(x.length, left);
    out.push({ length: n, flags: x.flags & ALLOCATION_FLAGS });
    left -= n;
  }
  return out;
}

function sanitizeDepths(got: readonly DepthExtent[], length: number): DepthExtent[] {
  if (got.length === 0) throw new RequestError('EIO', 'allocation-depth: the device returned no extents');
  const out: DepthExtent[] = [];
  let left = length;
  for (let i = 0; i < got.length && left > 0 && out.length < MAX_EXTENTS; i++) {
    const x = got[i]!;
    if (!Number.isSafeInteger(x.length) || x.length <= 0 || !Number.isInteger(x.depth) || x.depth < 0) {
      throw new RequestError('EIO', `allocation-depth: the device returned an invalid extent ${JSON.stringify(x)}`);
    }
    const n = Math.min(x.length, left);
    out.push(n === x.length ? x : { length: n, depth: x.depth });
    left -= n;
  }
  return out;
}

/** Wrap `dev` in a Backend (the function form of `new Backend`). */
export function wrapBackend(dev: BlockDevice, opts?: BackendOptions): Backend {
  return new Backend(dev, opts);
}
