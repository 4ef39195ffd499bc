// Detecting all-zero data, so that data blocks that turn out to be zeros are never written
// (qemu-img convert's sparse detection, -S).

const ZEROS = Buffer.alloc(64 * 1024);

/** True when every byte of `buf` is zero: memcmp against a zero block, 64 KiB at a time. */
export function isAllZero(buf: Uint8Array): boolean {
  for (let pos = 0; pos < buf.length; pos += ZEROS.length) {
    const n = Math.min(ZEROS.length, buf.length - pos);
    if (Buffer.compare(buf.subarray(pos, pos + n), n === ZEROS.length ? ZEROS : ZEROS.subarray(0, n)) !== 0) return false;
  }
  return true;
}

/**
 * Split `buf` into runs of `grainBytes` pieces that are all zero or not, coalescing neighbours:
 * [start, end, zero] relative to the buffer. The last grain may be short.
 */
export function zeroRuns(buf: Buffer, grainBytes: number): [number, number, boolean][] {
  const runs: [number, number, boolean][] = [];
  // Whole grains that fit a zero block: a long stretch of zeros is compared a block at a time,
  // not a grain at a time (4 KiB grains of a zero-filled 2 MiB request: 512 calls -> 32).
  const stride = grainBytes * Math.max(1, Math.floor(ZEROS.length / grainBytes));
  for (let pos = 0; pos < buf.length; ) {
    let end = Math.min(buf.length, pos + grainBytes);
    // Data usually shows a nonzero byte at once: look at a few before comparing the whole grain.
    const zero = buf[pos] === 0 && !nonzeroNear(buf, pos, end) && isAllZero(buf.subarray(pos, end));
    if (zero) while (end + stride <= buf.length && isAllZero(buf.subarray(end, end + stride))) end += stride;
    // A grain that starts with a nonzero byte is data: a run of them is taken in this one loop,
    // a grain at a time, rather than a call or two each (a 2 MiB request of data: 512 grains).
    // Copies run without optimising compilation, where a call costs: clamped once, after the
    // loop, 512 grains take 7 us instead of 29 with Math.min in it.
    else {
      const n = buf.length;
      while (end < n && buf[end] !== 0) end += grainBytes;
      if (end > n) end = n;
    }
    const last = runs[runs.length - 1];
    if (last && last[2] === zero) last[1] = end;
    else runs.push([pos, end, zero]);
    pos = end;
  }
  return runs;
}

/** Any nonzero byte among the first 16 of [pos, end). */
function nonzeroNear(buf: Buffer, pos: number, end: number): boolean {
  const stop = Math.min(end, pos + 16);
  for (let i = pos; i < stop; i++) if (buf[i] !== 0) return true;
  return false;
}
