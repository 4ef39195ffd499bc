// Zeroing and deallocating ranges of a host file with fallocate(2), remembering which modes
// the file system refused so that an unsupported mode costs one system call, not one per
// request. Format drivers (raw, qed, vdi) share it for their data areas.

import { writeZeros } from '../block/zero-buffer.js';
import { RequestError } from '../errors.js';
import { isNotSupported } from '../sys/errno.js';
import { fallocate, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../sys/libc.js';
import type { HostFile } from './host-file.js';

const PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;

export class FileZeroing {
  private readonly file: HostFile;
  private punchUnsupported = false;
  private zeroRangeUnsupported = false;

  constructor(file: HostFile) {
    this.file = file;
  }

  /** Deallocate the range (it then reads as zeros). False when the file system cannot. */
  async punch(offset: number, length: number): Promise<boolean> {
    if (this.punchUnsupported) return false;
    try {
      this.file.madeHoles();
      await fallocate(this.file.fd, PUNCH, offset, length);
      return true;
    } catch (e) {
      if (!isNotSupported(e)) throw e;
      this.punchUnsupported = true;
      return false;
    }
  }

  /**
   * Make the range read as zeros without writing them: a hole when `mayPunch`, else
   * FALLOC_FL_ZERO_RANGE (allocated zeros). False when neither mode is available.
   */
  async zeroWithoutWriting(offset: number, length: number, mayPunch: boolean): Promise<boolean> {
    if (mayPunch && (await this.punch(offset, length))) return true;
    if (this.zeroRangeUnsupported) return false;
    try {
      await fallocate(this.file.fd, ZERO_RANGE, offset, length);
      return true;
    } catch (e) {
      if (!isNotSupported(e)) throw e;
      this.zeroRangeUnsupported = true;
      return false;
    }
  }

  /**
   * Zero the range by any means: without writing when possible, otherwise by writing zeros,
   * unless `fast` (NBD_CMD_FLAG_FAST_ZERO) asks to fail with ENOTSUP instead.
   */
  async zero(offset: number, length: number, opts: { mayPunch: boolean; fast: boolean; what: string }): Promise<void> {
    if (await this.zeroWithoutWriting(offset, length, opts.mayPunch)) return;
    if (opts.fast) throw new RequestError('ENOTSUP', `${opts.what}: the host file system cannot zero ${length} bytes at ${offset} without writing them`);
    await writeZeros((b, o) => this.file.pwrite(b, o), offset, length);
  }
}
