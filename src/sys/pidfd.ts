// Waiting for another process to exit: pidfd_open(2) (Linux 5.3+, glibc 2.36 wrapper) gives
// an fd that polls readable when the process exits, with no pid-reuse race; without it
// (older kernels or libc), the fallback polls kill(pid, 0).

import koffi from 'koffi';
import { SyscallError } from './errno.js';
import { closeFd, waitReadable } from './socket.js';

type PidfdOpenFn = (pid: number, flags: number) => number;
let pidfdOpenFn: PidfdOpenFn | null | undefined;

function binding(): PidfdOpenFn | null {
  if (pidfdOpenFn === undefined) {
    try {
      pidfdOpenFn = koffi.load('libc.so.6').func('int pidfd_open(int pid, unsigned int flags)') as unknown as PidfdOpenFn;
    } catch {
      pidfdOpenFn = null;
    }
  }
  return pidfdOpenFn;
}

/** A pidfd for `pid`, or null when pidfd_open is unavailable (ENOSYS, old libc). ESRCH throws. */
export function pidfdOpen(pid: number): number | null {
  const fn = binding();
  if (!fn) return null;
  const fd = fn(pid, 0);
  if (fd >= 0) return fd;
  const errno = koffi.errno();
  const err = new SyscallError('pidfd_open', errno);
  if (err.code === 'ENOSYS') return null;
  throw err;
}

/** kill(pid, 0): true while the process exists (EPERM: it exists but is not ours). */
export function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface ProcessWatch {
  /** Resolves when the process has exited (or was already gone), never rejects. */
  readonly exited: Promise<void>;
  /** Stop watching; `exited` then never resolves. */
  stop(): void;
  /** 'pidfd' or 'poll': which mechanism is in use. */
  readonly mechanism: 'pidfd' | 'poll';
}

const SLICE_MS = 500;

/**
 * Watch `pid` until it exits. The pidfd is polled on the thread pool in slices, so stop()
 * takes effect within one slice and never leaves a thread blocked for good.
 */
export function watchProcess(pid: number, pollIntervalMs = SLICE_MS): ProcessWatch {
  let stopped = false;
  let fd: number | null = null;
  try {
    fd = pidfdOpen(pid);
  } catch (e) {
    if ((e as SyscallError).code !== 'ESRCH') throw e;
    return { exited: Promise.resolve(), stop: () => undefined, mechanism: 'pidfd' };
  }
  const mechanism = fd === null ? 'poll' : 'pidfd';
  const exited = new Promise<void>((resolve) => {
    const loop = async (): Promise<void> => {
      while (!stopped) {
        if (fd !== null) {
          if (await waitReadable(fd, pollIntervalMs)) break;
        } else {
          if (!processExists(pid)) break;
          await new Promise((r) => setTimeout(r, pollIntervalMs));
        }
      }
      if (fd !== null) closeFd(fd);
      fd = null;
      if (!stopped) resolve();
    };
    void loop();
  });
  return {
    exited,
    mechanism,
    stop: () => {
      stopped = true;
    },
  };
}
