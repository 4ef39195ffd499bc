// Writes that arrive in one event-loop turn and follow each other in the file leave as one
// pwritev(2): a stream of 256 KiB sequential writes then costs one thread-pool round trip per
// few MiB instead of one per request. Each write's promise settles when the pwritev that
// carried it has; nothing is acknowledged earlier than it would have been alone.

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
  private runs: Run[] = [];
  private scheduled = false;

  constructor(private readonly fd: number) {}

  write(buf: Buffer, offset: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const last = this.runs[this.runs.length - 1];
      if (last !== undefined && last.offset + last.bytes === offset && last.bytes + buf.length <= MAX_RUN_BYTES && last.bufs.length < MAX_RUN_BUFFERS) {
        last.bufs.push(buf);
        last.bytes += buf.length;
        last.waiters.push({ resolve, reject });
      } else {
        this.runs.push({ offset, bytes: buf.length, bufs: [buf], waiters: [{ resolve, reject }] });
      }
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(this.issue);
      }
    });
  }

  private readonly issue = (): void => {
    this.scheduled = false;
    const runs = this.runs;
    this.runs = [];
    for (const run of runs) this.writeRun(run, run.bufs, run.offset);
  };

  private writeRun(run: Run, bufs: Buffer[], offset: number): void {
    writev(this.fd, bufs, offset, (err, n) => {
      if (err) {
        for (const w of run.waiters) w.reject(err);
        return;
      }
      const rest = skipBytes(bufs, n);
      if (n === 0 && rest.length > 0) {
        const e = new Error(`pwritev made no progress at offset ${offset}`) as NodeJS.ErrnoException;
        e.code = 'EIO';
        for (const w of run.waiters) w.reject(e);
        return;
      }
      if (rest.length === 0) {
        for (const w of run.waiters) w.resolve();
        return;
      }
      this.writeRun(run, rest, offset + n);
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
