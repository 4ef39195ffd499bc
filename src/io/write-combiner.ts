// Writes that follow each other in the file leave as one pwritev(2): those that arrive in one
// event-loop turn, and those that arrive while earlier writes are still in the thread pool
// (they wait, and go together when their turn comes). A stream of 256 KiB sequential writes
// then costs one thread-pool round trip per few MiB instead of one per request. Each write's
// promise settles when the pwritev that carried it has; nothing is acknowledged earlier than it
// would have been alone.
//
// A regular file takes one large pwritev at a time: Linux file systems serialise buffered writes
// to one file on the inode lock, so more would only spin on it, and waiting writes merge better.
// Small writes (random 4 KiB ones) hold the lock for a moment and are bound by the thread-pool
// round trip instead, so several of them go at once.

import { writev } from 'node:fs';

/** Largest run handed to one pwritev. */
const MAX_RUN_BYTES = 4 * 1024 * 1024;
/** IOV_MAX is 1024 on Linux. */
const MAX_RUN_BUFFERS = 1024;
/** Runs at least this long count as large (copy-bound rather than latency-bound). */
const LARGE_RUN_BYTES = 128 * 1024;
/** pwritevs in flight at once, small ones included. */
const MAX_IN_FLIGHT = 16;

interface Run {
  readonly offset: number;
  bytes: number;
  readonly bufs: Buffer[];
  readonly waiters: { resolve: () => void; reject: (e: Error) => void }[];
}

export class WriteCombiner {
  /** Runs not yet issued, by the offset where they end (where a next write would extend them). */
  private readonly open = new Map<number, Run>();
  /** Runs not yet issued, oldest first. */
  private queue: Run[] = [];
  /** End offsets of runs in the thread pool: a run starting there waits for it. */
  private readonly inFlightEnds = new Set<number>();
  private readonly inFlightRuns = new Set<Run>();
  private inFlight = 0;
  private largeInFlight = 0;
  private scheduled = false;

  /**
   * `maxLargeInFlight`: large pwritevs at once (1 for a regular file, more for a block device).
   * `reserve`: called just before a large run is handed to the thread pool (HostFile.reserve:
   * with one large run at a time, nothing else holds the file's inode lock then).
   */
  constructor(
    private readonly fd: number,
    private readonly maxLargeInFlight = 1,
    private readonly reserve?: (offset: number, length: number) => void,
  ) {}

  write(buf: Buffer, offset: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const run = this.open.get(offset);
      if (run !== undefined && run.bytes + buf.length <= MAX_RUN_BYTES && run.bufs.length < MAX_RUN_BUFFERS) {
        this.open.delete(offset);
        run.bufs.push(buf);
        run.bytes += buf.length;
        run.waiters.push({ resolve, reject });
        this.open.set(offset + buf.length, run);
        return;
      }
      const fresh: Run = { offset, bytes: buf.length, bufs: [buf], waiters: [{ resolve, reject }] };
      this.open.set(offset + buf.length, fresh);
      this.queue.push(fresh);
      if (!this.scheduled) {
        // The end of the turn: writes arriving meanwhile still join the run.
        this.scheduled = true;
        setImmediate(this.onTurnEnd);
      }
    });
  }

  /**
   * A write of [offset, offset + length) waits here or is in the thread pool: a write made
   * elsewhere now could land before it.
   */
  overlaps(offset: number, length: number): boolean {
    const end = offset + length;
    for (const run of this.queue) if (run.offset < end && offset < run.offset + run.bytes) return true;
    for (const run of this.inFlightRuns) if (run.offset < end && offset < run.offset + run.bytes) return true;
    return false;
  }

  private readonly onTurnEnd = (): void => {
    this.scheduled = false;
    this.issueReady();
  };

  private issueReady(): void {
    if (this.inFlight >= MAX_IN_FLIGHT || this.queue.length === 0) return;
    const keep: Run[] = [];
    for (const run of this.queue) {
      // A run that continues one in flight waits for it: it would only take the inode lock
      // after it anyway, and meanwhile it can grow.
      const large = run.bytes >= LARGE_RUN_BYTES;
      const room = this.inFlight < MAX_IN_FLIGHT && (!large || this.largeInFlight < this.maxLargeInFlight);
      if (room && !this.inFlightEnds.has(run.offset)) this.issue(run);
      else keep.push(run);
    }
    this.queue = keep;
  }

  private issue(run: Run): void {
    const end = run.offset + run.bytes;
    // No more appends: a write arriving now starts a run of its own.
    if (this.open.get(end) === run) this.open.delete(end);
    const large = run.bytes >= LARGE_RUN_BYTES;
    this.inFlight++;
    if (large) this.largeInFlight++;
    this.inFlightEnds.add(end);
    this.inFlightRuns.add(run);
    if (large) this.reserve?.(run.offset, run.bytes);
    this.writeRun(run.bufs, run.offset, (err) => {
      this.inFlight--;
      if (large) this.largeInFlight--;
      this.inFlightEnds.delete(end);
      this.inFlightRuns.delete(run);
      for (const w of run.waiters) {
        if (err) w.reject(err);
        else w.resolve();
      }
      this.issueReady();
    });
  }

  private writeRun(bufs: Buffer[], offset: number, done: (err: Error | null) => void): void {
    writev(this.fd, bufs, offset, (err, n) => {
      if (err) return done(err);
      const rest = skipBytes(bufs, n);
      if (rest.length === 0) return done(null);
      if (n === 0) {
        const e = new Error(`pwritev made no progress at offset ${offset}`) as NodeJS.ErrnoException;
        e.code = 'EIO';
        return done(e);
      }
      this.writeRun(rest, offset + n, done);
    });
  }
}

/** What remains of `bufs` after its first `n` bytes (a short write). */
function skipBytes(bufs: Buffer[], n: number): Buffer[] {
  let i = 0;
  while (i < bufs.length && n >= bufs[i]!.length) n -= bufs[i++]!.length;
  if (i === bufs.length) return [];
  return [bufs[i]!.subarray(n), ...bufs.slice(i + 1)];
}
