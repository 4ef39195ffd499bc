// errno values from raw syscalls made through the FFI, turned into errors shaped like Node's
// own (`code` is the errno name), so toNbdErrno() and callers treat them like fs errors.

import koffi from 'koffi';
import { ImgbdError } from '../errors.js';

let names: Map<number, string> | undefined;

function errnoName(errno: number): string {
  // Linux defines ENOTSUP as EOPNOTSUPP (95); report the name fallocate(2) documents.
  if (errno === 95) return 'EOPNOTSUPP';
  if (!names) {
    names = new Map();
    for (const [name, value] of Object.entries(koffi.os.errno as Record<string, number>)) {
      if (!names.has(value)) names.set(value, name);
    }
  }
  return names.get(errno) ?? `ERRNO_${errno}`;
}

/** A failed system call; `code` is the errno name ('ENXIO', 'EOPNOTSUPP', ...). */
export class SyscallError extends ImgbdError {
  readonly errno: number;
  readonly syscall: string;

  constructor(syscall: string, errno: number) {
    const code = errnoName(errno);
    super(code, `${syscall} failed: ${code} (errno ${errno})`);
    this.errno = errno;
    this.syscall = syscall;
  }
}

/**
 * The operation is not implemented by this filesystem, device or kernel (ENODEV: fallocate on
 * a block device before Linux 4.9; ENOTTY: an ioctl the device does not know).
 */
export function isNotSupported(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'ENOTTY' || code === 'ENODEV';
}
