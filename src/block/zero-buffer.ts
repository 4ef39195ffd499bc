// One shared buffer of zeros for layers that emulate zeroing by writing, so that a large
// write-zeroes request costs bounded memory and no allocation per request.

export const ZERO_BUFFER_BYTES = 1024 * 1024;

let zeros: Buffer | undefined;

/**
 * A 1 MiB buffer of zeros shared by every caller. It is only ever a write *source*: never
 * read into it or hand it to anything that could.
 */
export function zeroBuffer(): Buffer {
  zeros ??= Buffer.alloc(ZERO_BUFFER_BYTES);
  return zeros;
}

/**
 * Write zeros over [offset, offset+length) with `write`, in chunks of at most `maxChunkBytes`
 * (rounded down to `alignBytes`), sequentially so at most one chunk is in flight.
 */
export async function writeZeros(
  write: (buf: Buffer, offset: number) => Promise<void>,
  offset: number,
  length: number,
  maxChunkBytes = ZERO_BUFFER_BYTES,
  alignBytes = 1,
): Promise<void> {
  const z = zeroBuffer();
  let chunk = Math.min(ZERO_BUFFER_BYTES, maxChunkBytes);
  chunk -= chunk % alignBytes;
  if (chunk <= 0) chunk = Math.min(ZERO_BUFFER_BYTES, maxChunkBytes);
  const end = offset + length;
  for (let pos = offset; pos < end; ) {
    const n = Math.min(chunk, end - pos);
    await write(n === z.length ? z : z.subarray(0, n), pos);
    pos += n;
  }
}
