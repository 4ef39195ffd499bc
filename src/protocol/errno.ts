// Error values on the wire (nbd-proto.md "Error values") and their names.

import type { NbdErrno } from '../errors.js';
import { NBD_ERRNO } from './constants.js';

const BY_VALUE = new Map<number, NbdErrno>(
  (Object.entries(NBD_ERRNO) as [NbdErrno, number][]).map(([name, value]) => [value, name]),
);

export function errnoToWire(errno: NbdErrno): number {
  return NBD_ERRNO[errno];
}

/** "A client MUST be prepared to handle unknown error values, treating them as NBD_EINVAL." */
export function wireToErrno(value: number): NbdErrno {
  return BY_VALUE.get(value) ?? 'EINVAL';
}
