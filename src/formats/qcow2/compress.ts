// Compressed cluster codecs (qcow2.txt, header field compression_type): raw deflate (zlib, type 0)
// through node:zlib and zstd (type 1) through the system's libzstd, or @bokuweb/zstd-wasm (its
// WebAssembly build ships inside the package) where there is none. A compressed cluster must
// inflate to exactly one cluster; the stored
// data is padded to 512-byte sectors and may be followed by another cluster's data, so the zstd
// frame length is found by walking the frame before decoding it.

import { createRequire } from 'node:module';
import { promisify } from 'node:util';
import type * as ZstdWasm from '@bokuweb/zstd-wasm';
import { CorruptImageError } from '../../errors.js';
import { loadNativeZstd, type NativeZstd } from '../../sys/zstd.js';
import { QCOW2_COMPRESSION, type Qcow2CompressionType } from './header.js';

// node:zlib loads when a zlib cluster is first met: most images never have one.
let zlibModule: typeof import('node:zlib') | undefined;
function zlib(): typeof import('node:zlib') {
  zlibModule ??= createRequire(import.meta.url)('node:zlib') as typeof import('node:zlib');
  return zlibModule;
}
const inflateRawAsync = (src: Buffer, o: import('node:zlib').ZlibOptions): Promise<Buffer> => promisify(zlib().inflateRaw)(src, o);
const deflateRawAsync = (src: Buffer, o: import('node:zlib').ZlibOptions): Promise<Buffer> => promisify(zlib().deflateRaw)(src, o);

/** QEMU's zstd level (ZSTD_CLEVEL_DEFAULT). */
const ZSTD_LEVEL = 3;

let native: NativeZstd | null | undefined;
/** The WebAssembly build, loaded only where there is no libzstd. */
let zstd: typeof ZstdWasm;
let wasmReady: Promise<void> | null = null;

/** Resolves once zstd can be called synchronously (compressClusterInto, the decoder). */
export function initZstd(): Promise<void> {
  native ??= loadNativeZstd();
  if (native !== null) return Promise.resolve();
  wasmReady ??= import('@bokuweb/zstd-wasm').then(async (m) => {
    await m.init();
    zstd = m;
  });
  return wasmReady;
}

/** One cluster as a zstd frame at QEMU's level; initZstd() must have resolved. */
function zstdCompressSync(src: Buffer): Buffer {
  return native ? native.compress(src, ZSTD_LEVEL) : Buffer.from(zstd.compress(src, ZSTD_LEVEL));
}

/**
 * Compress one whole cluster into `dst` on the calling thread (initZstd() must have resolved
 * for zstd): the compressed length, or -1 when it does not fit in `dst`.
 */
export function compressClusterInto(type: Qcow2CompressionType, src: Buffer, dst: Buffer): number {
  if (type === QCOW2_COMPRESSION.ZSTD && native) return native.compressInto(src, dst, ZSTD_LEVEL);
  const out = type === QCOW2_COMPRESSION.ZLIB ? zlib().deflateRawSync(src, { windowBits: 12, level: zlib().constants.Z_DEFAULT_COMPRESSION }) : zstdCompressSync(src);
  if (out.length > dst.length) return -1;
  out.copy(dst);
  return out.length;
}

function zstdDecompress(frame: Buffer, out: Buffer): Uint8Array {
  if (native) return out.subarray(0, native.decompress(frame, out));
  return zstd.decompress(frame, { defaultHeapSize: out.length });
}

const ZSTD_MAGIC = 0xfd2fb528;

/**
 * Length in bytes of the zstd frame at the start of `src` and its declared content size
 * (null when absent). Throws CorruptImageError when the frame runs past `src`.
 */
export function measureZstdFrame(src: Buffer): { frameBytes: number; contentSize: number | null } {
  const bad = (why: string): never => {
    throw new CorruptImageError(`qcow2: bad zstd compressed cluster: ${why}`);
  };
  if (src.length < 6 || src.readUInt32LE(0) !== ZSTD_MAGIC) bad('no frame magic');
  const fhd = src[4]!;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const didFlag = fhd & 3;
  if ((fhd & 0x08) !== 0) bad('reserved frame header bit set');
  let pos = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][didFlag]!;
  const fcsBytes = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  if (pos + fcsBytes > src.length) bad('truncated frame header');
  let contentSize: number | null = null;
  if (fcsBytes === 1) contentSize = src[pos]!;
  else if (fcsBytes === 2) contentSize = src.readUInt16LE(pos) + 256;
  else if (fcsBytes === 4) contentSize = src.readUInt32LE(pos);
  else if (fcsBytes === 8) {
    const v = src.readBigUInt64LE(pos);
    contentSize = v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
  }
  pos += fcsBytes;
  for (;;) {
    if (pos + 3 > src.length) bad('truncated block header');
    const bh = src[pos]! | (src[pos + 1]! << 8) | (src[pos + 2]! << 16);
    pos += 3;
    const last = bh & 1;
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    if (type === 3) bad('reserved block type');
    pos += type === 1 ? 1 : size;
    if (pos > src.length) bad('block runs past the compressed data');
    if (last) break;
  }
  if (checksum) pos += 4;
  if (pos > src.length) bad('checksum runs past the compressed data');
  return { frameBytes: pos, contentSize };
}

/** Decompress one cluster of `clusterSize` bytes into `out` (which is exactly clusterSize long). */
export async function decompressCluster(type: Qcow2CompressionType, src: Buffer, out: Buffer): Promise<void> {
  const clusterSize = out.length;
  let data: Uint8Array;
  if (type === QCOW2_COMPRESSION.ZLIB) {
    try {
      // Z_SYNC_FLUSH: like QEMU, accept data that fills the cluster without a final block marker.
      data = await inflateRawAsync(src, { maxOutputLength: clusterSize, finishFlush: zlib().constants.Z_SYNC_FLUSH });
    } catch (err) {
      throw new CorruptImageError(`qcow2: compressed cluster does not inflate: ${(err as Error).message}`, { cause: err });
    }
  } else {
    await initZstd();
    const { frameBytes, contentSize } = measureZstdFrame(src);
    if (contentSize !== null && contentSize !== clusterSize) throw new CorruptImageError(`qcow2: zstd cluster declares ${contentSize} bytes, not ${clusterSize}`);
    try {
      data = zstdDecompress(src.subarray(0, frameBytes), out);
    } catch (err) {
      throw new CorruptImageError(`qcow2: zstd cluster does not decompress: ${(err as Error).message}`, { cause: err });
    }
  }
  if (data.length !== clusterSize) throw new CorruptImageError(`qcow2: compressed cluster inflates to ${data.length} bytes, not ${clusterSize}`);
  if (data.buffer !== out.buffer || data.byteOffset !== out.byteOffset) out.set(data);
}

/** Compress one cluster; null when the result would not save space (QEMU then writes it plainly). */
export async function compressCluster(type: Qcow2CompressionType, src: Buffer): Promise<Buffer | null> {
  let out: Buffer;
  if (type === QCOW2_COMPRESSION.ZLIB) {
    // QEMU uses window bits -12 and the default level.
    out = await deflateRawAsync(src, { windowBits: 12, level: zlib().constants.Z_DEFAULT_COMPRESSION });
  } else {
    await initZstd();
    out = zstdCompressSync(src);
  }
  return out.length < src.length ? out : null;
}
