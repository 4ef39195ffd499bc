// Read-only views of a file's page cache: mmap(2) of the file, handed out as Buffers over the
// mapped pages. A copy that reads its source only to write it elsewhere then skips the read's
// copy into process memory: the write copies straight from the page cache (a cached 1 GiB raw
// -> raw copy on 2 cores: 240 ms with pread + pwrite, 165 ms writing from the mapping).
//
// A view is only made of pages in the page cache (mincore(2)), so touching it does not wait for
// the disk on the event loop, and never reaches past the end of the file (no page there is
// cached). A file truncated under a view after that would raise SIGBUS on access: views are
// only for files opened read-only for a copy, which nobody should be shrinking meanwhile.
// Pages are mapped as they are touched, mostly by the thread pool's writes: mapping them all
// first (MADV_POPULATE_READ) cost the event loop 23 ms of a 1 GiB copy.
//
// The file is mapped in large windows, each wrapped in one ArrayBuffer, and views are slices of
// them: V8 counts every new ArrayBuffer over outside memory as memory allocated, and collects
// garbage when that grows. One per 2 MiB request cost 35 ms of a 1 GiB copy, 16-64 MiB windows
// 20-30 ms, one 1 GiB window 5 ms; a window ends at the end of the file (the size it had when
// first mapped), so a small file costs nothing.

import { fstatSync } from 'node:fs';
import koffi from 'koffi';

/** sys/mman.h */
const PROT_READ = 0x1;
const MAP_SHARED = 0x01;
const SC_PAGESIZE = 30;

/** Bytes per window, a multiple of any page size; a view never crosses a window's end. */
const WINDOW_BYTES = 1024 * 1024 * 1024;
/** Idle windows kept mapped beyond this many are unmapped. */
const MAX_WINDOWS = 4;

type Call = (...args: unknown[]) => unknown;

interface Bindings {
  readonly mmap: Call;
  readonly munmap: (addr: bigint, length: number) => number;
  readonly mincore: (addr: bigint, length: number, vec: Buffer) => number;
  readonly pageBytes: number;
}

let bound: Bindings | null | undefined;

function bind(): Bindings | null {
  if (bound !== undefined) return bound;
  try {
    const lib = koffi.load('libc.so.6');
    const sysconf = lib.func('long sysconf(int name)') as unknown as (name: number) => number;
    bound = {
      mmap: lib.func('void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)') as unknown as Call,
      munmap: lib.func('int munmap(uintptr_t addr, size_t length)') as unknown as Bindings['munmap'],
      mincore: lib.func('int mincore(uintptr_t addr, size_t length, void *vec)') as unknown as Bindings['mincore'],
      pageBytes: sysconf(SC_PAGESIZE),
    };
  } catch {
    bound = null;
  }
  return bound;
}

/** A slice of a mapped window: `buf` may be read until release(), and never after. */
export interface MappedView {
  readonly buf: Buffer;
  release(): void;
}

interface Window {
  readonly address: bigint;
  /** Bytes mapped: whole pages. */
  readonly mapped: number;
  /** The file's bytes in it: up to the end of the file. */
  readonly buf: Buffer;
  users: number;
  lastUse: number;
}

/** (void *)-1 */
const MAP_FAILED = 0xffffffffffffffffn;

/** Residency vector, grown as needed and reused: calls are synchronous. */
let residency = Buffer.alloc(0);

/** Read-only windows onto one open file; close() once no view is in use. */
export class MappedFile {
  private readonly windows = new Map<number, Window>();
  private uses = 0;
  private broken = false;
  /** The file's size when first mapped: windows end there. */
  private sizeBytes = -1;

  constructor(private readonly fd: number) {}

  /**
   * A view of the file from `offset`, `length` bytes or up to the end of its window if that comes
   * first, when every page of it is in the page cache; null otherwise (read it instead).
   */
  view(offset: number, length: number): MappedView | null {
    const b = bound === undefined ? bind() : bound;
    if (b === null || this.broken || length <= 0 || offset < 0 || !Number.isSafeInteger(offset + length)) return null;
    const index = Math.floor(offset / WINDOW_BYTES);
    const w = this.windows.get(index) ?? this.open(b, index);
    if (w === null) return null;
    const from = offset - index * WINDOW_BYTES;
    const n = Math.min(length, w.buf.length - from);
    if (n <= 0) return null;
    const pageStart = from - (from % b.pageBytes);
    const span = from + n - pageStart;
    const pages = Math.ceil(span / b.pageBytes);
    if (residency.length < pages) residency = Buffer.alloc(Math.max(pages, 2 * residency.length));
    const at = w.address + BigInt(pageStart);
    if (b.mincore(at, span, residency) !== 0 || !allResident(residency, pages)) return null;
    w.users++;
    w.lastUse = ++this.uses;
    let released = false;
    return {
      buf: w.buf.subarray(from, from + n),
      release: () => {
        if (released) return;
        released = true;
        w.users--;
      },
    };
  }

  /** Unmap every window. Views still held would point at unmapped memory: release them first. */
  close(): void {
    const b = bound;
    for (const w of this.windows.values()) if (b) b.munmap(w.address, w.mapped);
    this.windows.clear();
    this.broken = true;
  }

  private open(b: Bindings, index: number): Window | null {
    if (this.sizeBytes < 0) {
      try {
        const st = fstatSync(this.fd);
        // A block device's size is not in its stat: map whole windows.
        this.sizeBytes = st.isFile() ? st.size : Number.MAX_SAFE_INTEGER;
      } catch {
        this.broken = true;
        return null;
      }
    }
    const start = index * WINDOW_BYTES;
    const bytes = Math.min(WINDOW_BYTES, this.sizeBytes - start);
    if (bytes <= 0) return null;
    const mapped = Math.ceil(bytes / b.pageBytes) * b.pageBytes;
    this.evictIdle(b);
    const ptr = b.mmap(null, mapped, PROT_READ, MAP_SHARED, this.fd, start);
    const address = BigInt(koffi.address(ptr) as unknown as bigint);
    if (address === 0n || address === MAP_FAILED) {
      // Not a mappable file (a pipe, a character device): stop asking.
      this.broken = true;
      return null;
    }
    const w: Window = { address, mapped, buf: Buffer.from(koffi.view(ptr, bytes)), users: 0, lastUse: 0 };
    this.windows.set(index, w);
    return w;
  }

  private evictIdle(b: Bindings): void {
    if (this.windows.size < MAX_WINDOWS) return;
    const idle = [...this.windows].filter(([, w]) => w.users === 0).sort((x, y) => x[1].lastUse - y[1].lastUse);
    for (const [index, w] of idle.slice(0, this.windows.size - MAX_WINDOWS + 1)) {
      b.munmap(w.address, w.mapped);
      this.windows.delete(index);
    }
  }
}

/** mincore's answer when every page is resident (each byte's other bits are reserved, zero). */
let allOnes = Buffer.alloc(0);

function allResident(vec: Buffer, pages: number): boolean {
  if (allOnes.length < pages) allOnes = Buffer.alloc(residency.length, 1);
  // One memcmp; a byte by byte look only if a reserved bit ever shows up.
  if (vec.compare(allOnes, 0, pages, 0, pages) === 0) return true;
  for (let i = 0; i < pages; i++) if ((vec[i]! & 1) === 0) return false;
  return true;
}
