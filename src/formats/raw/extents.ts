// Allocation of a host file from lseek(2) SEEK_DATA/SEEK_HOLE: data extents are flags 0,
// holes read as zeros (EXTENT_HOLE | EXTENT_ZERO). The walk is bounded: every step advances,
// and it stops after `maxExtents` descriptors (NBD lets a server return less than asked).

import { EXTENT_HOLE, EXTENT_ZERO, type Extent } from '../../block/device.js';
import { seekData, seekHole } from '../../sys/libc.js';

const HOLE_FLAGS = EXTENT_HOLE | EXTENT_ZERO;

/** Far below NBD's 2^20-descriptor ceiling, and enough that a client rarely needs a second call. */
export const MAX_EXTENTS_PER_CALL = 4096;

/**
 * Extents of [offset, offset+length) of `fd`. Throws what lseek throws other than ENXIO
 * (EINVAL when the filesystem has no SEEK_DATA); the caller then reports everything as data.
 */
export function seekExtents(fd: number, offset: number, length: number, one: boolean, maxExtents = MAX_EXTENTS_PER_CALL): Extent[] {
  const end = offset + length;
  const out: Extent[] = [];
  let pos = offset;
  while (pos < end && out.length < maxExtents) {
    const data = seekData(fd, pos);
    // ENXIO: nothing but hole from `pos` to EOF (and past it, which pread fills with zeros).
    if (data === null || data > pos) {
      const holeEnd = data === null ? end : Math.min(data, end);
      out.push({ length: holeEnd - pos, flags: HOLE_FLAGS });
      pos = holeEnd;
    } else {
      const hole = seekHole(fd, pos);
      // A hole at or before a data byte is impossible; if a filesystem says so, call the rest
      // data (always safe) so the walk still ends.
      const dataEnd = hole === null || hole <= pos ? end : Math.min(hole, end);
      out.push({ length: dataEnd - pos, flags: 0 });
      pos = dataEnd;
    }
    if (one) break;
  }
  return out;
}
