// Writing a file's data back to the disk while it is still being filled (convert, copy into a
// new image), so that the flush that ends the job finds little left to do: the disk works
// during the copy instead of after it. Only a hint to the kernel, never waited for; the flush
// still makes everything durable.

import { close, constants as fsConstants, open } from 'node:fs';
import { startWriteback } from '../sys/libc.js';

export class EarlyWriteback {
  private inFlight: Promise<void> | null = null;
  private off = false;

  private constructor(private readonly fd: number) {}

  /** For the file at `path` (opened read-only: writeback is per file, not per descriptor); null if it cannot be opened. */
  static open(path: string): Promise<EarlyWriteback | null> {
    return new Promise((resolve) => open(path, fsConstants.O_RDONLY, (err, fd) => resolve(err ? null : new EarlyWriteback(fd))));
  }

  /** Start writing back what is dirty, unless that is already under way. */
  kick(): void {
    if (this.inFlight !== null || this.off) return;
    this.inFlight = startWriteback(this.fd).then(
      () => void (this.inFlight = null),
      // Not supported here (a file system without it): the final flush does it all, as before.
      () => void (this.off = true),
    );
  }

  async close(): Promise<void> {
    this.off = true;
    await this.inFlight;
    await new Promise<void>((resolve) => close(this.fd, () => resolve()));
  }
}
