// convert: copy an image into a new image of another format (qemu-img convert, qemu-img.rst
// "convert"). Sparse: holes, zero extents and all-zero data are not written to a fresh target.
// -c compresses every qcow2 data cluster on a thread pool; -B makes the target an overlay of a
// backing file and writes only what differs from it; -n writes into an existing target (and
// any NBD export) instead of creating one.

// The registry first: the format modules import it back, and it must see them initialised.
import '../formats/registry.js';
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { dirname, isAbsolute, resolve } from 'node:path';
import { canonicalPath } from '../io/realpath.js';
import { Backend } from '../block/backend.js';
import type { BlockDevice } from '../block/device.js';
import { UnsupportedImageError, UsageError } from '../errors.js';
import { Qcow2Device } from '../formats/qcow2/index.js';
import { EarlyWriteback } from '../io/early-writeback.js';
import { CompressPool } from './compress-pool.js';
import { createImage, type ImageCreateOptions } from './create-target.js';
import { isNbdUri, openTarget } from './open.js';
import { setQcow2LazyRefcounts } from './qcow2-features.js';
import { deviceTarget, transfer, type TransferStats, type TransferTarget } from './transfer.js';

export interface ConvertOptions {
  readonly source: string;
  /** Probed when omitted. */
  readonly sourceFormat?: string;
  readonly target: string;
  /** Default raw; ignored for an NBD target. */
  readonly targetFormat?: string;
  readonly create?: ImageCreateOptions;
  /** Compress data clusters (qcow2 targets only). */
  readonly compress?: boolean;
  /** Requests in flight (qemu-img -m); default 8, or 4 into a local image without compression. */
  readonly workers?: number;
  readonly requestBytes?: number;
  /** Compression threads; default compressThreads(type). */
  readonly threads?: number;
  /** Write into an existing target instead of creating it (qemu-img -n). */
  readonly skipCreate?: boolean;
  /** Passed to the source's driver: where its backing files may live. */
  readonly allowBacking?: readonly string[] | boolean;
  /**
   * Skip the final flush (cache mode "unsafe", qemu-img's default for convert targets and
   * the CLI's): the target may not be on disk when convert returns. Default false here:
   * flushed before returning.
   */
  readonly noFlush?: boolean;
  readonly onProgress?: (doneBytes: number, totalBytes: number) => void;
}

export interface ConvertResult extends TransferStats {
  readonly sizeBytes: number;
  readonly targetFormat: string;
}

const DEFAULT_REQUEST_BYTES = 2 * 1024 * 1024;
/**
 * Requests in flight by default. A local target takes one write at a time (write-combiner.ts),
 * so more requests only keep more buffers out of the CPU cache while they wait: a cached 1 GiB
 * qcow2 -> raw took 0.18 s with 4 and 0.21 s with 8 (median of 8), and from an uncached source
 * 4 was as fast as 8. Compression threads and NBD round trips want more.
 */
const WORKERS_LOCAL = 4;
const WORKERS = 8;
/** Progress between two nudges to write the target back early (see EarlyWriteback). */
const WRITEBACK_STEP_BYTES = 32 * 1024 * 1024;

/**
 * Compression threads when -c does not say: one per core for zlib, one fewer for zstd. zstd
 * compresses a cluster several times faster than zlib, so the event loop (reading, finding
 * zeros, writing) sets the pace, and a thread per core only takes turns with it: on 2 cores a
 * 1 GiB zstd convert took 0.27 s with one thread and 0.29-0.57 s with two (zlib: 3.0 s with
 * one, 1.8 s with two).
 */
export function compressThreads(type: 0 | 1, cores = availableParallelism()): number {
  return type === 1 ? Math.max(1, cores - 1) : cores;
}

/** Grain for zero detection and request alignment: the target's allocation unit, within [4K, 2M]. */
function grainFor(dev: BlockDevice): number {
  const p = dev.blockSizes().preferred;
  return Math.min(2 * 1024 * 1024, Math.max(4096, p));
}

export async function convertImage(o: ConvertOptions): Promise<ConvertResult> {
  const targetIsNbd = isNbdUri(o.target);
  const targetFormat = targetIsNbd ? 'raw' : (o.targetFormat ?? 'raw');
  if (o.compress && targetFormat !== 'qcow2') throw new UsageError(`-c needs a qcow2 target, not ${targetFormat}`);
  const backing = o.create?.backingFile;
  if (backing !== undefined && o.skipCreate) throw new UsageError('-B creates the target: it cannot be combined with -n');
  if (!targetIsNbd && !isNbdUri(o.source) && existsSync(o.target) && (await canonicalPath(o.target)) === (await canonicalPath(o.source))) {
    throw new UsageError(`${o.target} is the source itself: converting would destroy it`);
  }
  const src = await openTarget(o.source, { format: o.sourceFormat, readOnly: true, allowBacking: o.allowBacking });
  let dst: BlockDevice | undefined;
  let pool: CompressPool | undefined;
  let writeback: EarlyWriteback | null = null;
  try {
    const sizeBytes = src.device.sizeBytes;
    const fresh = !targetIsNbd && o.skipCreate !== true;
    // A fresh qcow2 v3 target is written with lazy refcounts (no flush per allocating write)
    // and switched back to what was asked for once complete.
    const q = o.create?.qcow2;
    const lazyWhileWriting = fresh && targetFormat === 'qcow2' && (q?.compat ?? '1.1') === '1.1' && q?.lazyRefcounts !== true;
    if (fresh) {
      const create = { ...o.create, cacheUnsafe: o.noFlush === true };
      await createImage(o.target, targetFormat, sizeBytes, lazyWhileWriting ? { ...create, qcow2: { ...q, lazyRefcounts: true } } : create);
    }
    // The target reads its backing file for -B (only what differs is written), so allow its directory.
    const backingPath = backing === undefined ? undefined : isAbsolute(backing) ? backing : resolve(dirname(resolve(o.target)), backing);
    const opened = await openTarget(o.target, {
      format: targetIsNbd ? undefined : targetFormat,
      readOnly: false,
      ...(backingPath !== undefined ? { allowBacking: [dirname(backingPath)] } : {}),
      // -t unsafe: no flush at all, as qemu-img's cache=unsafe (the lazy-refcount switch included).
      ...(o.noFlush === true ? { cacheUnsafe: true } : {}),
    });
    dst = opened.device;
    if (dst.sizeBytes < sizeBytes) throw new UsageError(`the target is smaller (${dst.sizeBytes} bytes) than the source (${sizeBytes} bytes)`);
    if (!dst.capabilities().writable) throw new UnsupportedImageError(`${o.target} is read-only`);
    const backend = new Backend(dst);
    let target: TransferTarget = deviceTarget(backend);
    let grainBytes = grainFor(dst);
    let compress: { pool: CompressPool; type: 0 | 1 } | undefined;
    if (o.compress) {
      const q = dst;
      if (!(q instanceof Qcow2Device)) throw new UsageError('-c needs a qcow2 target');
      grainBytes = q.geometry.clusterSize;
      pool = new CompressPool(o.threads ?? compressThreads(q.header.compressionType));
      compress = { pool, type: q.header.compressionType };
      target = { ...target, writeCompressedRun: (buf, offset, packed) => q.writeCompressedRun(buf, offset, packed) };
    }
    const requestBytes = Math.max(grainBytes, o.requestBytes ?? DEFAULT_REQUEST_BYTES);
    // The flush at the end waits for the disk: have it write while the copy goes on.
    if (o.noFlush !== true && !targetIsNbd) writeback = await EarlyWriteback.open(o.target);
    let nudged = 0;
    const stats = await transfer({
      sources: [src.device],
      targets: [target],
      requestBytes,
      workers: o.workers ?? (targetIsNbd || o.compress === true ? WORKERS : WORKERS_LOCAL),
      grainBytes,
      targetZeroed: fresh && backing === undefined,
      onlyDifferences: backing !== undefined,
      compress,
      onProgress: (done) => {
        if (done - nudged >= WRITEBACK_STEP_BYTES) {
          nudged = done;
          writeback?.kick();
        }
        o.onProgress?.(done, sizeBytes);
      },
    });
    if (o.noFlush !== true) await backend.flush();
    const d = dst;
    dst = undefined;
    await d.close();
    if (lazyWhileWriting) await setQcow2LazyRefcounts(o.target, false, { cacheUnsafe: o.noFlush === true });
    return { ...stats, sizeBytes, targetFormat };
  } finally {
    await writeback?.close();
    await pool?.close();
    await dst?.close();
    await src.device.close();
  }
}
