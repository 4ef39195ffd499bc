// A file or block device on the host, opened once, read and written at offsets.
// Format drivers (raw, qcow2, qed, vdi) build on this; it loops over short reads and
// writes so callers always get whole transfers.

import { close, fdatasync, fstat, open, read, write, ftruncate, constants as fsConstants } from 'node:fs';
import { RequestError } from '../errors.js';

export interface HostFileOptions {
  readonly readOnly?: boolean;
  /** Open with O_DIRECT (caller must align buffers/offsets). */
  readonly direct?: boolean;
  /** Create the file if missing (exclusive when `exclusive`). */
  readonly create?: boolean;
  readonly exclusive?: boolean;
  /**
   * Cache mode "unsafe" (qemu-img convert's default for targets): datasync() returns at once.
   * For targets the user will not rely on until something else flushes them.
   */
  readonly ignoreFlush?: boolean;
}

function callback<T>(resolve: (v: T) => void, reject: (e: Error) => void) {
  return (err: NodeJS.ErrnoException | null, v: T) => (err ? reject(err) : resolve(v));
}

export class HostFile {
  readonly path: string;
  readonly fd: number;
  readonly readOnly: boolean;
  readonly isBlockDevice: boolean;
  private closed = false;

  private constructor(
    path: string,
    fd: number,
    readOnly: boolean,
    isBlockDevice: boolean,
    private readonly ignoreFlush: boolean,
  ) {
    this.path = path;
    this.fd = fd;
    this.readOnly = readOnly;
    this.isBlockDevice = isBlockDevice;
  }

  static async open(path: string, opts: HostFileOptions = {}): Promise<HostFile> {
    let flags = opts.readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR;
    if (opts.create) flags |= fsConstants.O_CREAT;
    if (opts.exclusive) flags |= fsConstants.O_EXCL;
    if (opts.direct) flags |= fsConstants.O_DIRECT;
    const fd = await new Promise<number>((res, rej) => open(path, flags, 0o644, callback(res, rej)));
    try {
      const st = await new Promise<import('node:fs').Stats>((res, rej) => fstat(fd, callback(res, rej)));
      return new HostFile(path, fd, opts.readOnly ?? false, st.isBlockDevice(), opts.ignoreFlush === true);
    } catch (e) {
      await new Promise<void>((res) => close(fd, () => res()));
      throw e;
    }
  }

  /** Current size of a regular file (block devices: use sys/blkdev). */
  async size(): Promise<number> {
    const st = await new Promise<import('node:fs').Stats>((res, rej) => fstat(this.fd, callback(res, rej)));
    return st.size;
  }

  /**
   * Read exactly buf.length bytes at `offset`. Bytes past end-of-file read as zeros
   * (sparse tails, images whose last cluster is short).
   */
  pread(buf: Buffer, offset: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const step = (done: number): void => {
        read(this.fd, buf, done, buf.length - done, offset + done, (err, n) => {
          if (err) return reject(err);
          if (n === 0) {
            buf.fill(0, done);
            return resolve();
          }
          if (done + n >= buf.length) return resolve();
          step(done + n);
        });
      };
      if (buf.length === 0) resolve();
      else step(0);
    });
  }

  /** Write all of buf at `offset`. */
  pwrite(buf: Buffer, offset: number): Promise<void> {
    if (this.readOnly) return Promise.reject(new RequestError('EPERM', `${this.path} is open read-only`));
    return new Promise((resolve, reject) => {
      const step = (done: number): void => {
        write(this.fd, buf, done, buf.length - done, offset + done, (err, n) => {
          if (err) return reject(err);
          if (done + n >= buf.length) return resolve();
          step(done + n);
        });
      };
      if (buf.length === 0) resolve();
      else step(0);
    });
  }

  datasync(): Promise<void> {
    if (this.ignoreFlush) return Promise.resolve();
    return new Promise((resolve, reject) => fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  truncate(length: number): Promise<void> {
    return new Promise((resolve, reject) => ftruncate(this.fd, length, (err) => (err ? reject(err) : resolve())));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await new Promise<void>((resolve, reject) => close(this.fd, (err) => (err ? reject(err) : resolve())));
  }
}
