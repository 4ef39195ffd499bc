// compare: are two images the same to a guest? (qemu-img compare, qemu-img.rst "compare").
// Ranges both sides report as zeros are not read; differences are reported at the first
// differing 512-byte sector, as qemu-img does. A size difference is allowed when the larger
// image's extra part reads as zeros, unless strict, which also requires equal allocation.

import { EXTENT_ZERO, type BlockDevice } from '../block/device.js';
import { walkExtents } from '../block/walk.js';
import { isAllZero } from './zero.js';

export interface CompareOptions {
  /** Sizes and block status must match too (qemu-img compare -s). */
  readonly strict?: boolean;
  readonly chunkBytes?: number;
  readonly onProgress?: (doneBytes: number, totalBytes: number) => void;
}

export type CompareResult =
  | { readonly identical: true; readonly sizeMismatch: boolean }
  | { readonly identical: false; readonly sizeMismatch: boolean; readonly reason: 'content' | 'status'; readonly offset: number }
  | { readonly identical: false; readonly sizeMismatch: true; readonly reason: 'size' };

const SECTOR = 512;

interface Segment {
  readonly offset: number;
  readonly length: number;
  readonly zeroA: boolean;
  readonly zeroB: boolean;
}

/** The pieces of [0, end) over which both devices' zero status is constant. */
async function* segments(a: BlockDevice, b: BlockDevice, end: number): AsyncGenerator<Segment> {
  const ia = walkExtents(a, 0, end);
  const ib = walkExtents(b, 0, end);
  let ea = (await ia.next()).value as { offset: number; length: number; flags: number } | undefined;
  let eb = (await ib.next()).value as { offset: number; length: number; flags: number } | undefined;
  let pos = 0;
  while (pos < end && ea && eb) {
    const stop = Math.min(ea.offset + ea.length, eb.offset + eb.length);
    yield { offset: pos, length: stop - pos, zeroA: (ea.flags & EXTENT_ZERO) !== 0, zeroB: (eb.flags & EXTENT_ZERO) !== 0 };
    pos = stop;
    if (pos >= ea.offset + ea.length) ea = (await ia.next()).value as typeof ea;
    if (pos >= eb.offset + eb.length) eb = (await ib.next()).value as typeof eb;
  }
}

function firstDifference(x: Buffer, y: Buffer): number {
  // Narrow down by halves of equal-comparison, then byte by byte in the last block.
  let lo = 0;
  let hi = x.length;
  while (hi - lo > 4096) {
    const mid = lo + Math.floor((hi - lo) / 2);
    if (x.subarray(lo, mid).equals(y.subarray(lo, mid))) lo = mid;
    else hi = mid;
  }
  for (let i = lo; i < hi; i++) if (x[i] !== y[i]) return i;
  return -1;
}

function firstNonZero(x: Buffer): number {
  for (let i = 0; i < x.length; i += SECTOR) if (!isAllZero(x.subarray(i, Math.min(x.length, i + SECTOR)))) return i;
  return -1;
}

export async function compareDevices(a: BlockDevice, b: BlockDevice, o: CompareOptions = {}): Promise<CompareResult> {
  const chunk = o.chunkBytes ?? 4 * 1024 * 1024;
  const common = Math.min(a.sizeBytes, b.sizeBytes);
  const total = Math.max(a.sizeBytes, b.sizeBytes);
  const sizeMismatch = a.sizeBytes !== b.sizeBytes;
  const bufA = Buffer.allocUnsafe(chunk);
  const bufB = Buffer.allocUnsafe(chunk);
  const zeros = Buffer.alloc(chunk);
  if (sizeMismatch && o.strict) return { identical: false, sizeMismatch: true, reason: 'size' };
  for await (const s of segments(a, b, common)) {
    if (o.strict && s.zeroA !== s.zeroB) return { identical: false, sizeMismatch, reason: 'status', offset: s.offset };
    if (s.zeroA && s.zeroB) {
      o.onProgress?.(s.offset + s.length, total);
      continue;
    }
    for (let off = s.offset; off < s.offset + s.length; off += chunk) {
      const n = Math.min(chunk, s.offset + s.length - off);
      const x = s.zeroA ? zeros.subarray(0, n) : bufA.subarray(0, n);
      const y = s.zeroB ? zeros.subarray(0, n) : bufB.subarray(0, n);
      await Promise.all([s.zeroA ? undefined : a.pread(x, off), s.zeroB ? undefined : b.pread(y, off)]);
      if (!x.equals(y)) {
        const at = firstDifference(x, y);
        return { identical: false, sizeMismatch, reason: 'content', offset: off + at - ((off + at) % SECTOR) };
      }
      o.onProgress?.(off + n, total);
    }
  }
  if (!sizeMismatch) return { identical: true, sizeMismatch };
  const longer = a.sizeBytes > b.sizeBytes ? a : b;
  for await (const e of walkExtents(longer, common, total)) {
    if ((e.flags & EXTENT_ZERO) !== 0) continue;
    for (let off = e.offset; off < e.offset + e.length; off += chunk) {
      const n = Math.min(chunk, e.offset + e.length - off);
      const x = bufA.subarray(0, n);
      await longer.pread(x, off);
      const at = firstNonZero(x);
      if (at >= 0) return { identical: false, sizeMismatch, reason: 'content', offset: off + at };
      o.onProgress?.(off + n, total);
    }
  }
  return { identical: true, sizeMismatch };
}
