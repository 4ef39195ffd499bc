// QEMU's rule for probed raw images (block/raw-format.c, raw_check_write): when the user did
// not name the format and the probe said raw, a guest must not be able to write a header
// that would make the next probe open the file as qcow2/qed/vdi/... — that would let it point
// a "backing file" at any host file. Such writes to the first 512 bytes fail with EPERM.
//
// The driver advertises a 512-byte minimum block size in that mode (as QEMU does), so a write
// touching the head covers all of it; a partial head write is still merged and checked.

import { RequestError } from '../../errors.js';
import { matchKnownMagic, PROBE_HEAD_BYTES } from '../magic.js';

/** Throws EPERM when `head` (the first bytes of the image after a write) probes as another format. */
export function assertStaysRaw(head: Buffer): void {
  const format = matchKnownMagic(head);
  if (format !== null) {
    throw new RequestError(
      'EPERM',
      `refusing to write a ${format} signature into the first ${PROBE_HEAD_BYTES} bytes of an image whose format was probed as raw (name the format explicitly to allow it)`,
    );
  }
}

/**
 * The head as it would be after writing `buf` at `offset` (< PROBE_HEAD_BYTES), given the
 * current head `current` (PROBE_HEAD_BYTES long). Returns a new buffer; `current` is untouched.
 */
export function mergeHead(current: Buffer, buf: Buffer, offset: number): Buffer {
  const head = Buffer.from(current);
  buf.copy(head, offset, 0, Math.min(buf.length, PROBE_HEAD_BYTES - offset));
  return head;
}
