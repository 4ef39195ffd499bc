// The throwaway copy-on-write overlay (qemu-nbd --snapshot): the next device is never
// written; writes land in an unlinked, sparse temporary file at the same offsets, tracked by
// a one-bit-per-granule bitmap. A granule is either wholly in the base or wholly in the
// overlay, so a write covering part of a granule first copies that granule up from the base.
// Reads take each run of granules from wherever it lives. Zeroing and trimming punch holes
// in the overlay and mark the granules. All changes vanish when the device is closed.
//
// Concurrency: requests that change granules hold a lock on their granule range, so a
// copy-up can never overwrite another request's data. Reads take no lock: a granule's bit is
// set only once its overlay copy is complete, and the base never changes.

import { randomBytes } from 'node:crypto';
import { unlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  EXTENT_HOLE,
  EXTENT_ZERO,
  type BlockDevice,
  type BlockSizes,
  type Capabilities,
  type Extent,
  type ExtentsOptions,
  type WriteOptions,
  type ZeroOptions,
} from '../device.js';
import { writeZeros, ZERO_BUFFER_BYTES } from '../zero-buffer.js';
import { RequestError, UsageError } from '../../errors.js';
import { HostFile } from '../../io/host-file.js';
import { isNotSupported } from '../../sys/errno.js';
import { fallocate, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE } from '../../sys/libc.js';
import { seekExtents } from '../../formats/raw/extents.js';

export interface OverlayOptions {
  /** Directory for the temporary file (default: os.tmpdir()). */
  readonly dir?: string;
  /** Copy-on-write unit: a power of two from 512 bytes to 1 MiB (default 64 KiB). */
  readonly granuleBytes?: number;
}

export const DEFAULT_GRANULE_BYTES = 64 * 1024;

const PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;

interface Held {
  readonly start: number;
  readonly end: number;
  readonly done: Promise<void>;
}

class OverlayDevice implements BlockDevice {
  readonly sizeBytes: number;
  private readonly next: BlockDevice;
  private readonly tmp: HostFile;
  private readonly granule: number;
  private readonly bitmap: Uint8Array;
  private readonly caps: Capabilities;
  private readonly sizes: BlockSizes;
  private anySet = false;
  private punchUnsupported = false;
  private readonly held: Held[] = [];

  constructor(next: BlockDevice, tmp: HostFile, granule: number) {
    this.next = next;
    this.tmp = tmp;
    this.granule = granule;
    this.sizeBytes = next.sizeBytes;
    this.bitmap = new Uint8Array(Math.ceil(Math.ceil(next.sizeBytes / granule) / 8));
    const nc = next.capabilities();
    this.caps = Object.freeze({
      writable: true,
      // Nothing here outlives the process, so there is nothing to make durable.
      flush: false,
      fua: false,
      trim: true,
      zero: true,
      fastZero: true,
      extents: true,
      allocationDepth: false,
      cache: false,
      multiConn: true,
      rotational: nc.rotational,
    });
    const ns = next.blockSizes();
    this.sizes = { minimum: ns.minimum, preferred: Math.max(ns.preferred, Math.min(granule, ns.maximum)), maximum: ns.maximum };
  }

  capabilities(): Capabilities {
    return this.caps;
  }

  blockSizes(): BlockSizes {
    return this.sizes;
  }

  // --- bitmap -------------------------------------------------------------------------------

  // Granule indexes can exceed 2^32 on huge devices, so no 32-bit shifts on them.
  private isSet(g: number): boolean {
    return (this.bitmap[Math.floor(g / 8)]! & (1 << g % 8)) !== 0;
  }

  private mark(firstG: number, endG: number): void {
    for (let g = firstG; g < endG; g++) this.bitmap[Math.floor(g / 8)]! |= 1 << g % 8;
    if (endG > firstG) this.anySet = true;
  }

  /** End of the run of granules sharing granule(pos)'s state, clipped to `end`. */
  private runEnd(pos: number, end: number, inOverlay: boolean): number {
    let g = Math.floor(pos / this.granule) + 1;
    let at = g * this.granule;
    while (at < end && this.isSet(g) === inOverlay) {
      g++;
      at += this.granule;
    }
    return Math.min(at, end);
  }

  // --- locking ------------------------------------------------------------------------------

  /** Wait until no other mutation holds a granule in [startG, endG), then hold them. */
  private async lock(startG: number, endG: number): Promise<() => void> {
    for (;;) {
      const other = this.held.find((h) => h.start < endG && startG < h.end);
      if (!other) break;
      await other.done;
    }
    let release!: () => void;
    const h: Held = { start: startG, end: endG, done: new Promise<void>((r) => (release = r)) };
    this.held.push(h);
    return () => {
      this.held.splice(this.held.indexOf(h), 1);
      release();
    };
  }

  private check(offset: number, length: number, write: boolean): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new RequestError(write ? 'ENOSPC' : 'EINVAL', `request [${offset}, +${length}) is outside the ${this.sizeBytes}-byte device`);
    }
  }

  // --- data path ----------------------------------------------------------------------------

  async pread(buf: Buffer, offset: number): Promise<void> {
    this.check(offset, buf.length, false);
    if (!this.anySet) return this.next.pread(buf, offset);
    const end = offset + buf.length;
    for (let pos = offset; pos < end; ) {
      const inOverlay = this.isSet(Math.floor(pos / this.granule));
      const stop = this.runEnd(pos, end, inOverlay);
      const part = buf.subarray(pos - offset, stop - offset);
      await (inOverlay ? this.tmp.pread(part, pos) : this.next.pread(part, pos));
      pos = stop;
    }
  }

  /** Copy granule `g` from the base into the overlay unless it is there already. Lock held. */
  private async copyUp(g: number): Promise<void> {
    if (this.isSet(g)) return;
    const start = g * this.granule;
    const buf = Buffer.allocUnsafe(Math.min(this.granule, this.sizeBytes - start));
    await this.next.pread(buf, start);
    await this.tmp.pwrite(buf, start);
    this.mark(g, g + 1);
  }

  /** Copy up the granules that [offset, end) covers only partly. Lock held. */
  private async copyUpEdges(offset: number, end: number): Promise<void> {
    const firstG = Math.floor(offset / this.granule);
    const lastG = Math.floor((end - 1) / this.granule);
    if (offset % this.granule !== 0) await this.copyUp(firstG);
    // copyUp is a no-op when the head copy-up already brought in the same granule.
    if (end !== Math.min((lastG + 1) * this.granule, this.sizeBytes)) await this.copyUp(lastG);
  }

  async pwrite(buf: Buffer, offset: number, _opts?: WriteOptions): Promise<void> {
    this.check(offset, buf.length, true);
    if (buf.length === 0) return;
    const end = offset + buf.length;
    const firstG = Math.floor(offset / this.granule);
    const endG = Math.floor((end - 1) / this.granule) + 1;
    const unlock = await this.lock(firstG, endG);
    try {
      await this.copyUpEdges(offset, end);
      await this.tmp.pwrite(buf, offset);
      this.mark(firstG, endG);
    } finally {
      unlock();
    }
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  /** Make [offset, offset+length) of the overlay file read as zeros. */
  private async zeroTmp(offset: number, length: number, fast: boolean): Promise<void> {
    if (!this.punchUnsupported) {
      try {
        await fallocate(this.tmp.fd, PUNCH, offset, length);
        return;
      } catch (e) {
        if (!isNotSupported(e)) throw e;
        this.punchUnsupported = true;
      }
    }
    if (fast) throw new RequestError('ENOTSUP', 'the overlay file cannot punch holes');
    await writeZeros((b, o) => this.tmp.pwrite(b, o), offset, length, ZERO_BUFFER_BYTES);
  }

  async zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.check(offset, length, true);
    if (length === 0) return;
    const end = offset + length;
    const firstG = Math.floor(offset / this.granule);
    const endG = Math.floor((end - 1) / this.granule) + 1;
    const fast = opts?.fast === true;
    if (fast && this.punchUnsupported) throw new RequestError('ENOTSUP', 'the overlay file cannot punch holes');
    const unlock = await this.lock(firstG, endG);
    try {
      await this.copyUpEdges(offset, end);
      await this.zeroTmp(offset, length, fast);
      this.mark(firstG, endG);
    } finally {
      unlock();
    }
  }

  /** Trim is advisory: only whole granules are dropped (to zeros in the overlay). */
  async trim(offset: number, length: number, _opts?: WriteOptions): Promise<void> {
    this.check(offset, length, false);
    const end = offset + length;
    const firstG = Math.ceil(offset / this.granule);
    const endG = end === this.sizeBytes ? Math.ceil(end / this.granule) : Math.floor(end / this.granule);
    if (endG <= firstG) return;
    const unlock = await this.lock(firstG, endG);
    try {
      const start = firstG * this.granule;
      const stop = Math.min(endG * this.granule, this.sizeBytes);
      await this.zeroTmp(start, stop - start, false);
      this.mark(firstG, endG);
    } finally {
      unlock();
    }
  }

  // --- metadata -----------------------------------------------------------------------------

  async extents(offset: number, length: number, opts?: ExtentsOptions): Promise<Extent[]> {
    this.check(offset, length, false);
    const one = opts?.one === true;
    const end = offset + length;
    const out: Extent[] = [];
    for (let pos = offset; pos < end; ) {
      const inOverlay = this.isSet(Math.floor(pos / this.granule));
      const stop = this.runEnd(pos, end, inOverlay);
      const part = inOverlay ? this.overlayExtents(pos, stop - pos, one) : await this.baseExtents(pos, stop - pos, one);
      let covered = 0;
      for (const x of part) {
        const last = out[out.length - 1];
        if (last && last.flags === x.flags) out[out.length - 1] = { length: last.length + x.length, flags: x.flags };
        else out.push(x);
        covered += x.length;
      }
      // A layer may answer short; the reply stays contiguous by stopping there.
      if (one || covered < stop - pos) break;
      pos = stop;
    }
    return one ? out.slice(0, 1) : out;
  }

  private overlayExtents(offset: number, length: number, one: boolean): Extent[] {
    try {
      // Punched (zeroed, trimmed) ranges are holes in the overlay file and read as zeros.
      return seekExtents(this.tmp.fd, offset, length, one);
    } catch {
      return [{ length, flags: 0 }];
    }
  }

  private async baseExtents(offset: number, length: number, one: boolean): Promise<Extent[]> {
    if (!this.next.extents || !this.next.capabilities().extents) return [{ length, flags: 0 }];
    const got = await this.next.extents(offset, length, { one });
    const out: Extent[] = [];
    let left = length;
    for (const x of got) {
      if (left <= 0) break;
      if (!(x.length > 0)) break;
      const n = Math.min(x.length, left);
      out.push({ length: n, flags: x.flags & (EXTENT_HOLE | EXTENT_ZERO) });
      left -= n;
    }
    return out.length > 0 ? out : [{ length, flags: 0 }];
  }

  async close(): Promise<void> {
    try {
      await this.tmp.close();
    } finally {
      await this.next.close();
    }
  }
}

/**
 * Put a throwaway copy-on-write overlay over `next` (which is only ever read). The temporary
 * file is unlinked at once, so nothing is left behind even if the process dies.
 */
export async function openOverlay(next: BlockDevice, opts: OverlayOptions = {}): Promise<BlockDevice> {
  const granule = opts.granuleBytes ?? DEFAULT_GRANULE_BYTES;
  if (!Number.isInteger(granule) || granule < 512 || granule > ZERO_BUFFER_BYTES || (granule & (granule - 1)) !== 0) {
    throw new UsageError(`overlay granule must be a power of two from 512 bytes to 1 MiB, not ${granule}`);
  }
  const min = next.blockSizes().minimum;
  if (granule % min !== 0) throw new UsageError(`overlay granule ${granule} is not a multiple of the device's minimum block size ${min}`);
  const path = join(opts.dir ?? tmpdir(), `imgbd-overlay-${process.pid}-${randomBytes(8).toString('hex')}`);
  const tmp = await HostFile.open(path, { create: true, exclusive: true });
  try {
    await unlink(path);
    await tmp.truncate(next.sizeBytes);
  } catch (e) {
    await tmp.close();
    throw e;
  }
  return new OverlayDevice(next, tmp, granule);
}
