// Writes that follow each other in the file leave as one pwritev(2): those that arrive in one
// event-loop turn, and those that arrive while the write just before them is still in the
// thread pool (they queue behind it and go together when it completes). A stream of 256 KiB
// sequential writes then costs one thread-pool round trip per few MiB instead of one per
// request. Each write's promise settles when the pwritev that carried it has; nothing is
// acknowledged earlier than it would have been alone.

import { writev } from 'node:fs';

/** Largest run handed to one pwritev. */
const MAX_RUN_BYTES = 4 * 1024 * 1024;
/** IOV_MAX is 1024 on Linux. */
const MAX_RUN_BUFFERS = 1024;

interface Run {
  readonly offset: number;
  bytes: number;
  readonly bufs: Buffer[];
  readonly waiters: { resolve: () => void; reject: (e: Error) => void }[];
}

export class WriteCombiner {
  /** Runs not yet issued, by the offset where they end (where a next write would extend them). */
  private readonly open = new Map<number, Run>();
  /** Runs to issue at the end of this turn. */
  private ready: Run[] = [];
  /** Runs waiting for the in-flight run that ends where they start, by that offset. */
  private readonly behind = new Map<number, Run>();
  /** End offsets of runs in the thread pool. */
  private readonly inFlightEnds = new Set<number>();
  private scheduled = false;

  constructor(private readonly fd: number) {}

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
      if (this.inFlightEnds.has(offset) && !this.behind.has(offset)) {
        this.behind.set(offset, fresh);
        return;
      }
      this.ready.push(fresh);
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(this.issueReady);
      }
    });
  }

  private readonly issueReady = (): void => {
    this.scheduled = false;
    const runs = this.ready;
    this.ready = [];
    for (const run of runs) this.issue(run);
  };

  private issue(run: Run): void {
    const end = run.offset + run.bytes;
    // No more appends: a write arriving now starts a run of its own, behind this one.
    if (this.open.get(end) === run) this.open.delete(end);
    this.inFlightEnds.add(end);
    this.writeRun(run, run.bufs, run.offset, (err) => {
      this.inFlightEnds.delete(end);
      for (const w of run.waiters) {
        if (err) w.reject(err);
        else w.resolve();
      }
      const next = this.behind.get(end);
      if (next !== undefined) {
        this.behind.delete(end);
        this.issue(next);
      }
    });
  }

  private writeRun(run: Run, bufs: Buffer[], offset: number, done: (err: Error | null) => void): void {
    writev(this.fd, bufs, offset, (err, n) => {
      if (err) return done(err);
      const rest = skipBytes(bufs, n);
      if (rest.length === 0) return done(null);
      if (n === 0) {
        const e = new Error(`pwritev made no progress at offset ${offset}`) as NodeJS.ErrnoException;
        e.code = 'EIO';
        return done(e);
      }
      this.writeRun(run, rest, offset + n, done);
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
