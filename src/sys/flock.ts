// flock(2) through koffi, non-blocking only (LOCK_NB): a caller that must wait retries on a
// timer, so the event loop never blocks on a lock held by another imgbd process.

import koffi from 'koffi';
import { SyscallError } from './errno.js';

export const LOCK_SH = 1;
export const LOCK_EX = 2;
export const LOCK_NB = 4;
export const LOCK_UN = 8;

type FlockFn = (fd: number, op: number) => number;
let flockFn: FlockFn | undefined;

/** Try to take the lock; false when another holder has it (EWOULDBLOCK). */
export function tryFlock(fd: number, op: number): boolean {
  flockFn ??= koffi.load('libc.so.6').func('int flock(int fd, int op)') as unknown as FlockFn;
  for (;;) {
    if (flockFn(fd, op | LOCK_NB) === 0) return true;
    const err = new SyscallError('flock', koffi.errno());
    if (err.code === 'EINTR') continue;
    if (err.code === 'EWOULDBLOCK' || err.code === 'EAGAIN') return false;
    throw err;
  }
}

/** Take the lock, retrying every `intervalMs` until `timeoutMs` passes (then throws ETIMEDOUT). */
export async function flockWait(fd: number, op: number, timeoutMs: number, intervalMs = 50): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!tryFlock(fd, op)) {
    if (Date.now() > deadline) throw new SyscallError('flock', 110 /* ETIMEDOUT */);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
