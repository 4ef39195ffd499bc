// Detecting all-zero data, so that data blocks that turn out to be zeros are never written
// (qemu-img convert's sparse detection, -S).

/** True when every byte of `buf` is zero; compares 8 bytes at a time when aligned. */
export function isAllZero(buf: Uint8Array): boolean {
  const words = buf.length >>> 3;
  if (buf.byteOffset % 8 === 0) {
    const view = new BigUint64Array(buf.buffer, buf.byteOffset, words);
    for (let i = 0; i < words; i++) if (view[i] !== 0n) return false;
    for (let i = words << 3; i < buf.length; i++) if (buf[i] !== 0) return false;
    return true;
  }
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/**
 * Split `buf` into runs of `grainBytes` pieces that are all zero or not, coalescing neighbours:
 * [start, end, zero] relative to the buffer. The last grain may be short.
 */
export function zeroRuns(buf: Buffer, grainBytes: number): [number, number, boolean][] {
  const runs: [number, number, boolean][] = [];
  for (let pos = 0; pos < buf.length; pos += grainBytes) {
    const end = Math.min(buf.length, pos + grainBytes);
    const zero = isAllZero(buf.subarray(pos, end));
    const last = runs[runs.length - 1];
    if (last && last[2] === zero) last[1] = end;
    else runs.push([pos, end, zero]);
  }
  return runs;
}
