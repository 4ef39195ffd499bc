// The BlockDevice interface: what every image driver, filter and remote export offers.
// Shaped after nbdkit's plugin API: a layer implements what it can, the backend wrapper
// (backend.ts) validates every request once and emulates what a layer lacks.

/** Allocation flags for base:allocation extents, numerically equal to NBD_STATE_HOLE / NBD_STATE_ZERO. */
export const EXTENT_HOLE = 1 as const;
export const EXTENT_ZERO = 2 as const;

export interface Extent {
  /** Bytes covered by this extent; extents are contiguous from the requested offset. */
  readonly length: number;
  /** Bitwise OR of EXTENT_HOLE and EXTENT_ZERO; 0 means allocated data. */
  readonly flags: number;
}

export interface DepthExtent {
  readonly length: number;
  /**
   * qemu:allocation-depth: 0 = unallocated in the whole chain, 1 = allocated in the top
   * image, N = allocated in the (N-1)th backing file.
   */
  readonly depth: number;
}

export interface Capabilities {
  /** pwrite/trim/zero are allowed. */
  readonly writable: boolean;
  /** flush() makes earlier writes durable (false: there is nothing to flush, e.g. a read-only file). */
  readonly flush: boolean;
  /** pwrite/zero/trim honour `fua` natively; otherwise the backend emulates FUA with flush(). */
  readonly fua: boolean;
  /** trim() deallocates. */
  readonly trim: boolean;
  /** zero() is natively efficient (not emulated by writing zeros). */
  readonly zero: boolean;
  /** zero() with `fast` can fail fast with ENOTSUP instead of being slow. */
  readonly fastZero: boolean;
  /** extents() reports real allocation (otherwise everything is data). */
  readonly extents: boolean;
  /** allocationDepth() is implemented. */
  readonly allocationDepth: boolean;
  /** cache() prefetches. */
  readonly cache: boolean;
  /**
   * Several connections may share this device: a flush on any connection makes every
   * completed write durable, whichever connection wrote it (NBD_FLAG_CAN_MULTI_CONN).
   */
  readonly multiConn: boolean;
  readonly rotational: boolean;
}

export interface BlockSizes {
  /** Requests must be aligned to this (power of two, 1..65536). */
  readonly minimum: number;
  /** Requests aligned to this are efficient (power of two, >= minimum). */
  readonly preferred: number;
  /** Largest request payload (multiple of minimum). */
  readonly maximum: number;
}

export interface WriteOptions {
  /** Force unit access: durable before the promise resolves. */
  readonly fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** May deallocate (i.e. NBD_CMD_FLAG_NO_HOLE was NOT set). */
  readonly mayTrim?: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than zero slowly. */
  readonly fast?: boolean;
}

export interface ExtentsOptions {
  /** NBD_CMD_FLAG_REQ_ONE: a single extent is enough. */
  readonly one?: boolean;
}

/** Guest bytes found unchanged in a host file (see BlockDevice.hostRun). */
export interface HostRun {
  readonly fd: number;
  readonly offset: number;
  readonly length: number;
}

export interface BlockDevice {
  /** Virtual size in bytes (a safe integer). */
  readonly sizeBytes: number;
  capabilities(): Capabilities;
  blockSizes(): BlockSizes;

  /** Fill `buf` with `buf.length` bytes from `offset`. The caller owns the buffer. */
  pread(buf: Buffer, offset: number): Promise<void>;
  /**
   * Optional fast path: fill `buf` synchronously when that cannot block (the data is in memory
   * or the page cache) and return true; return false, maybe having written into `buf`, when
   * the caller must use pread. The server tries it first for every read.
   */
  readNow?(buf: Buffer, offset: number): boolean;
  /**
   * Optional zero-copy path: where [offset, offset+length) begins with bytes stored as they
   * are in a host file, that file and where in it (the run may be shorter than `length`).
   * The server may then send the bytes with sendfile(2). Null: no such run here.
   */
  hostRun?(offset: number, length: number): HostRun | null;
  /**
   * Where a write of [offset, offset+length) may go straight into a host file, bytes unchanged
   * (a caller splicing a payload from a socket): null unless this layer is a plain file at that
   * range, that writing there needs nothing else done, and a buffered write is all it takes.
   */
  hostWriteRun?(offset: number, length: number): HostRun | null;
  pwrite?(buf: Buffer, offset: number, opts?: WriteOptions): Promise<void>;
  /**
   * Optional fast path: write `buf` synchronously when all it takes is a buffered write into a
   * host file (no allocation, no metadata, nothing queued that it could overtake) and return
   * true; return false when the caller must use pwrite (which may then write the range again).
   */
  writeNow?(buf: Buffer, offset: number): boolean;
  flush?(): Promise<void>;
  trim?(offset: number, length: number, opts?: WriteOptions): Promise<void>;
  zero?(offset: number, length: number, opts?: ZeroOptions): Promise<void>;
  /** Extents covering at least the first byte of [offset, offset+length), at most up to its end. */
  extents?(offset: number, length: number, opts?: ExtentsOptions): Promise<Extent[]>;
  allocationDepth?(offset: number, length: number): Promise<DepthExtent[]>;
  cache?(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}

/** A filter wraps the next device and returns a device (nbdkit's filter shape). */
export type Filter<Opts> = (next: BlockDevice, opts: Opts) => BlockDevice;

export const DEFAULT_BLOCK_SIZES: BlockSizes = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
