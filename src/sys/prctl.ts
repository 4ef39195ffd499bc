// Process attributes the attach supervisor needs and Node does not expose: prctl(2)
// PR_SET_IO_FLUSHER (linux/prctl.h, Linux 5.6+) and the OOM killer score (proc(5)
// /proc/[pid]/oom_score_adj).
//
// A process that serves a block device the kernel writes back to must not itself be throttled
// by writeback or reclaim into that same device, and must not be the OOM killer's choice:
// either would deadlock or lose the filesystem's data.

import koffi from 'koffi';
import { writeFileSync } from 'node:fs';
import { SyscallError } from './errno.js';

/** linux/prctl.h */
export const PR_SET_IO_FLUSHER = 57;
export const PR_GET_IO_FLUSHER = 58;

type PrctlFn = (option: number, a2: number, a3: number, a4: number, a5: number) => number;
let prctlFn: PrctlFn | undefined;

function prctl(): PrctlFn {
  prctlFn ??= koffi.load('libc.so.6').func('int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)') as unknown as PrctlFn;
  return prctlFn;
}

/** PR_SET_IO_FLUSHER: allocations of this process never recurse into filesystem or block I/O. Needs CAP_SYS_RESOURCE. */
export function setIoFlusher(): void {
  if (prctl()(PR_SET_IO_FLUSHER, 1, 0, 0, 0) < 0) throw new SyscallError('prctl(PR_SET_IO_FLUSHER)', koffi.errno());
}

/** PR_GET_IO_FLUSHER: 1 when this process is an I/O flusher. */
export function isIoFlusher(): boolean {
  const r = prctl()(PR_GET_IO_FLUSHER, 0, 0, 0, 0);
  if (r < 0) throw new SyscallError('prctl(PR_GET_IO_FLUSHER)', koffi.errno());
  return r === 1;
}

/** Write /proc/self/oom_score_adj (-1000 exempts this process from the OOM killer; lowering it needs CAP_SYS_RESOURCE). */
export function setOomScoreAdj(value: number): void {
  if (!Number.isInteger(value) || value < -1000 || value > 1000) throw new RangeError(`oom_score_adj ${value} is outside -1000..1000`);
  writeFileSync('/proc/self/oom_score_adj', `${value}\n`);
}
