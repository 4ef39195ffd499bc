// zstd through the system's libzstd (the library qemu-img itself links), called with koffi.
// The WebAssembly build is a portable fallback but compresses 64 KiB clusters about twenty
// times slower; native contexts are made once per thread and reused, so a cluster costs one
// call. Null when libzstd.so.1 cannot be loaded.

import koffi from 'koffi';

export interface NativeZstd {
  /** The compressed frame of `src` (a fresh buffer). */
  compress(src: Buffer, level: number): Buffer;
  /** Compress `src` into `dst`: the frame's length, or -1 when it does not fit. */
  compressInto(src: Buffer, dst: Buffer, level: number): number;
  /** Decode one whole frame into `out`; the number of bytes it decoded to. */
  decompress(frame: Buffer, out: Buffer): number;
}

type SizeT = number | bigint;

/** zstd_errors.h: ZSTD_error_dstSize_tooSmall. */
const ZSTD_ERROR_DST_SIZE_TOO_SMALL = 70;

let loaded: NativeZstd | null | undefined;

export function loadNativeZstd(): NativeZstd | null {
  if (loaded !== undefined) return loaded;
  try {
    const lib = koffi.load('libzstd.so.1');
    const compressBound = lib.func('size_t ZSTD_compressBound(size_t srcSize)') as (n: number) => SizeT;
    const isError = lib.func('unsigned int ZSTD_isError(size_t code)') as (code: SizeT) => number;
    const errorName = lib.func('const char *ZSTD_getErrorName(size_t code)') as (code: SizeT) => string;
    const errorCode = lib.func('int ZSTD_getErrorCode(size_t code)') as (code: SizeT) => number;
    const createCCtx = lib.func('void *ZSTD_createCCtx(void)') as () => unknown;
    const createDCtx = lib.func('void *ZSTD_createDCtx(void)') as () => unknown;
    const compressCCtx = lib.func('size_t ZSTD_compressCCtx(void *cctx, void *dst, size_t dstCapacity, const void *src, size_t srcSize, int level)') as (
      cctx: unknown, dst: Buffer, cap: number, src: Buffer, n: number, level: number) => SizeT;
    const decompressDCtx = lib.func('size_t ZSTD_decompressDCtx(void *dctx, void *dst, size_t dstCapacity, const void *src, size_t srcSize)') as (
      dctx: unknown, dst: Buffer, cap: number, src: Buffer, n: number) => SizeT;
    const cctx = createCCtx();
    const dctx = createDCtx();
    if (cctx === null || dctx === null) throw new Error('ZSTD_create*Ctx failed');
    let scratch = Buffer.alloc(0);
    const check = (r: SizeT, what: string): number => {
      if (isError(r) !== 0) throw new Error(`zstd ${what}: ${errorName(r)}`);
      return Number(r);
    };
    loaded = {
      compress(src, level) {
        const bound = Number(compressBound(src.length));
        if (scratch.length < bound) scratch = Buffer.allocUnsafe(bound);
        const n = check(compressCCtx(cctx, scratch, scratch.length, src, src.length, level), 'compression');
        return Buffer.from(scratch.subarray(0, n));
      },
      compressInto(src, dst, level) {
        const r = compressCCtx(cctx, dst, dst.length, src, src.length, level);
        if (isError(r) !== 0 && errorCode(r) === ZSTD_ERROR_DST_SIZE_TOO_SMALL) return -1;
        return check(r, 'compression');
      },
      decompress(frame, out) {
        return check(decompressDCtx(dctx, out, out.length, frame, frame.length), 'decompression');
      },
    };
  } catch {
    loaded = null;
  }
  return loaded;
}
