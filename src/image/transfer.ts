// The sparse-aware parallel copy loop shared by copy and convert: walk the source's allocation
// map, read data in requests, skip what reads as zeros (holes, zero extents and all-zero data,
// detected per grain), and write the rest through several workers. Options add qcow2
// compression on a thread pool and "write only what differs from what the target already
// reads" (convert -B, rebase).

import { EXTENT_ZERO, type BlockDevice } from '../block/device.js';
import { walkExtents } from '../block/walk.js';
import { sharedBuffer, type CompressPool } from './compress-pool.js';
import { mapNext, type MapPolicy } from './copy-balance.js';
import { releasePieces, SourceMappings } from './mapped-source.js';
import { zeroRuns } from './zero.js';

export interface TransferJob {
  readonly offset: number;
  readonly length: number;
  /** The source reads as zeros over the whole range. */
  readonly zero: boolean;
}

/** Where a transfer writes; one per connection of the target. */
export interface TransferTarget {
  readonly device: BlockDevice;
  /** Write data that is not all zeros. */
  write(buf: Buffer, offset: number): Promise<void>;
  /** Make the range read as zeros. */
  zero(offset: number, length: number): Promise<void>;
  /** Write whole clusters already compressed by the pool, one result each (null: it did not compress). */
  writeCompressedRun?(buf: Buffer, offset: number, packed: readonly (Buffer | null)[]): Promise<void>;
}

export interface TransferOptions {
  /** One per connection of the source; workers take them round robin. */
  readonly sources: readonly BlockDevice[];
  readonly targets: readonly TransferTarget[];
  /** Bytes copied: the source's size unless a range is given. */
  readonly start?: number;
  readonly end?: number;
  readonly requestBytes: number;
  /** Concurrent requests in flight (qemu-img convert -m). */
  readonly workers: number;
  /**
   * Zero detection granularity; data requests are aligned to it, so two workers never write the
   * same grain (a qcow2 cluster when compressing, or a cluster of the target's format).
   */
  readonly grainBytes: number;
  /** The target already reads zeros everywhere (a fresh image): zero ranges are skipped. */
  readonly targetZeroed: boolean;
  /** Read the target first and write only the grains that differ (convert -B, rebase). */
  readonly onlyDifferences?: boolean;
  /** Compress every data grain (grainBytes must be the qcow2 cluster size). */
  readonly compress?: { readonly pool: CompressPool; readonly type: 0 | 1 };
  /** Restrict the walk: ranges where this returns false are left alone (rebase: unallocated only). */
  readonly include?: (offset: number, length: number) => AsyncIterable<{ offset: number; length: number }>;
  readonly onProgress?: (doneBytes: number) => void;
  /** When to write data from the source's mapped page cache (copy-balance.ts); default 'balance'. */
  readonly mapSource?: MapPolicy;
}

export interface TransferStats {
  /** Bytes of data written (excluding zeroing). */
  writtenBytes: number;
  /** Bytes made zero on the target by zero requests. */
  zeroedBytes: number;
  /** Bytes read from the source. */
  readBytes: number;
  /** Of those, bytes taken from the source's page cache through a mapping, not read. */
  mappedBytes: number;
}

const alignDown = (x: number, a: number): number => x - (x % a);
const alignUp = (x: number, a: number): number => Math.ceil(x / a) * a;

/**
 * The jobs of [start, end): data ranges widened to whole grains (so each grain belongs to one
 * job), zero ranges narrowed to what is left, data split into requests, zeros kept whole up to
 * 1 GiB (NBD lengths are 32-bit).
 */
export async function* planJobs(src: BlockDevice, start: number, end: number, requestBytes: number, grainBytes: number): AsyncGenerator<TransferJob> {
  let cursor = start;
  const emit = function* (offset: number, stop: number, zero: boolean): Generator<TransferJob> {
    const step = zero ? 2 ** 30 : requestBytes;
    for (let off = offset; off < stop; off += step) yield { offset: off, length: Math.min(step, stop - off), zero };
  };
  for await (const e of walkExtents(src, start, end)) {
    const eEnd = e.offset + e.length;
    if (eEnd <= cursor) continue;
    if ((e.flags & EXTENT_ZERO) !== 0) {
      const stop = eEnd >= end ? end : Math.max(cursor, alignDown(eEnd, grainBytes));
      if (stop > cursor) yield* emit(cursor, stop, true);
      cursor = Math.max(cursor, stop);
    } else {
      const from = Math.max(cursor, start + alignDown(e.offset - start, grainBytes));
      if (from > cursor) yield* emit(cursor, from, true);
      const stop = Math.min(end, start + alignUp(eEnd - start, grainBytes));
      yield* emit(from, stop, false);
      cursor = stop;
    }
  }
  if (cursor < end) yield* emit(cursor, end, true);
}

/** Plain targets: a BlockDevice (wrapped by the caller in a Backend so zero() always exists). */
export function deviceTarget(device: BlockDevice): TransferTarget {
  return {
    device,
    write: (buf, offset) => device.pwrite!(buf, offset),
    zero: (offset, length) => device.zero!(offset, length, { mayTrim: true }),
  };
}

/** Run the transfer; resolves once every write has completed (the caller flushes). */
export async function transfer(o: TransferOptions): Promise<TransferStats> {
  const start = o.start ?? 0;
  const end = o.end ?? o.sources[0]!.sizeBytes;
  const requestBytes = alignUp(o.requestBytes, o.grainBytes);
  const stats: TransferStats = { writtenBytes: 0, zeroedBytes: 0, readBytes: 0, mappedBytes: 0 };
  const queue = planFiltered(o, start, end, requestBytes);
  // Generators cannot be advanced concurrently: workers take jobs through one chain.
  let chain: Promise<IteratorResult<TransferJob>> = Promise.resolve({ done: false, value: undefined as unknown as TransferJob });
  let failed = false;
  const take = async (): Promise<TransferJob | undefined> => {
    chain = chain.then(() => queue.next());
    const r = await chain;
    return r.done || failed ? undefined : r.value;
  };
  let done = 0;
  const workers: Promise<void>[] = [];
  const ctx = { mappings: new SourceMappings(), mapPolicy: o.mapSource ?? 'balance' };
  for (let w = 0; w < Math.max(1, o.workers); w++) {
    const src = o.sources[w % o.sources.length]!;
    const dst = o.targets[w % o.targets.length]!;
    // Compression threads read the data where it was read, and write into `packed`.
    const buf = o.compress ? sharedBuffer(requestBytes) : Buffer.allocUnsafe(requestBytes);
    const packed = o.compress ? sharedBuffer(requestBytes) : undefined;
    const old = o.onlyDifferences ? Buffer.allocUnsafe(requestBytes) : undefined;
    workers.push(
      (async () => {
        try {
          for (let job = await take(); job; job = await take()) {
            await runJob(o, stats, src, dst, job, buf, old, packed, ctx);
            done += job.length;
            o.onProgress?.(done);
          }
        } catch (err) {
          failed = true;
          throw err;
        }
      })(),
    );
  }
  try {
    await allSettled(workers);
  } finally {
    ctx.mappings.close();
  }
  return stats;
}

async function* planFiltered(o: TransferOptions, start: number, end: number, requestBytes: number): AsyncGenerator<TransferJob> {
  if (!o.include) {
    yield* planJobs(o.sources[0]!, start, end, requestBytes, o.grainBytes);
    return;
  }
  for await (const r of o.include(start, end)) yield* planJobs(o.sources[0]!, r.offset, r.offset + r.length, requestBytes, o.grainBytes);
}

async function runJob(
  o: TransferOptions,
  stats: TransferStats,
  src: BlockDevice,
  dst: TransferTarget,
  job: TransferJob,
  buf: Buffer,
  old: Buffer | undefined,
  packed: Buffer | undefined,
  ctx: { readonly mappings: SourceMappings; readonly mapPolicy: MapPolicy },
): Promise<void> {
  if (job.zero && !o.onlyDifferences) {
    if (!o.targetZeroed) {
      await dst.zero(job.offset, job.length);
      stats.zeroedBytes += job.length;
    }
    return;
  }
  if (job.zero) {
    // Only differences: zero what the target does not already read as zeros, a request at a time.
    for (let off = job.offset; off < job.offset + job.length; off += buf.length) {
      const n = Math.min(buf.length, job.offset + job.length - off);
      const cur = old!.subarray(0, n);
      await dst.device.pread(cur, off);
      for (const [a, b, zero] of zeroRuns(cur, o.grainBytes)) {
        if (zero) continue;
        await dst.zero(off + a, b - a);
        stats.zeroedBytes += b - a;
      }
    }
    return;
  }
  // Cached plain data may be written from the page cache itself, the read's copy skipped (see
  // copy-balance.ts). Compression threads cannot see a mapping; -B compares with the target first.
  const pieces = packed === undefined && old === undefined && mapNext(ctx.mapPolicy, stats) ? ctx.mappings.map(src, job.offset, job.length) : null;
  if (pieces !== null) {
    stats.readBytes += job.length;
    stats.mappedBytes += job.length;
    try {
      await allSettled(pieces.map((p) => writeGrains(o, stats, dst, p.view.buf, p.offset)));
    } finally {
      // Only now: a write still running would read unmapped memory, or another mapping at its address.
      releasePieces(pieces);
    }
    return;
  }
  const data = buf.subarray(0, job.length);
  // Data in the page cache is copied here and now, without a round trip to the thread pool.
  if (src.readNow?.(data, job.offset) !== true) await src.pread(data, job.offset);
  stats.readBytes += job.length;
  if (old) {
    const cur = old.subarray(0, job.length);
    await dst.device.pread(cur, job.offset);
    // Runs of neighbouring grains that differ go out as one request each.
    const writes: Promise<void>[] = [];
    let runStart = -1;
    for (let a = 0; ; a = Math.min(job.length, a + o.grainBytes)) {
      const b = Math.min(job.length, a + o.grainBytes);
      const differs = a < job.length && !data.subarray(a, b).equals(cur.subarray(a, b));
      if (differs && runStart < 0) runStart = a;
      if (!differs && runStart >= 0) {
        writes.push(writeGrains(o, stats, dst, data.subarray(runStart, a), job.offset + runStart, packed?.subarray(runStart, a)));
        runStart = -1;
      }
      if (a >= job.length) break;
    }
    await allSettled(writes);
    return;
  }
  await writeGrains(o, stats, dst, data, job.offset, packed);
}

/**
 * Write `data` at `offset`, skipping (or zeroing) the all-zero grains, compressing when asked
 * into `packed` (shared memory at least as long as `data`, not used by other writes meanwhile).
 */
async function writeGrains(o: TransferOptions, stats: TransferStats, dst: TransferTarget, data: Buffer, offset: number, packed?: Buffer): Promise<void> {
  const runs = zeroRuns(data, o.grainBytes);
  const writes: Promise<void>[] = [];
  const toCompress: Buffer[] = [];
  const compressRuns: [number, number][] = [];
  for (const [a, b, zero] of runs) {
    if (zero) {
      if (!o.targetZeroed || o.onlyDifferences) {
        writes.push(dst.zero(offset + a, b - a));
        stats.zeroedBytes += b - a;
      }
      continue;
    }
    if (!o.compress) {
      writes.push(dst.write(data.subarray(a, b), offset + a));
      stats.writtenBytes += b - a;
      continue;
    }
    compressRuns.push([a, b]);
    for (let c = a; c < b; c += o.grainBytes) toCompress.push(data.subarray(c, Math.min(b, c + o.grainBytes)));
  }
  if (toCompress.length > 0) {
    // Each cluster is compressed whole: a short last cluster is padded with zeros, as the driver would.
    const results = await o.compress!.pool.compress(o.compress!.type, toCompress, o.grainBytes, packed!);
    let i = 0;
    for (const [a, b] of compressRuns) {
      const n = Math.ceil((b - a) / o.grainBytes);
      const mine = results.slice(i, i + n);
      for (let k = 0; k < n; k++) stats.writtenBytes += mine[k]?.length ?? toCompress[i + k]!.length;
      writes.push(dst.writeCompressedRun!(data.subarray(a, b), offset + a, mine));
      i += n;
    }
  }
  await allSettled(writes);
}

/** Wait for every promise, then throw the first failure: callers reuse or unmap the buffers they read. */
async function allSettled(promises: readonly Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(promises);
  const bad = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (bad) throw bad.reason;
}
