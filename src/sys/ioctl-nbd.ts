// The NBD ioctl interface (linux/nbd.h), the fallback for kernels without the nbd generic
// netlink family, and BLKRRPART / BLKFLSBUF (linux/fs.h) for re-reading the partition table
// and flushing a block device's buffers.
//
//   NBD_SET_SOCK        _IO(0xab, 0)   arg: connected socket fd (the kernel takes a reference)
//   NBD_SET_BLKSIZE     _IO(0xab, 1)   arg: block size in bytes
//   NBD_DO_IT           _IO(0xab, 3)   blocks until the device is disconnected
//   NBD_CLEAR_SOCK      _IO(0xab, 4)
//   NBD_SET_SIZE_BLOCKS _IO(0xab, 7)   arg: size in blocks of the block size
//   NBD_DISCONNECT      _IO(0xab, 8)
//   NBD_SET_TIMEOUT     _IO(0xab, 9)   arg: seconds
//   NBD_SET_FLAGS       _IO(0xab, 10)  arg: transmission flags (NBD_FLAG_*)
//   BLKRRPART           _IO(0x12, 95)
//   BLKFLSBUF           _IO(0x12, 97)
//
// Everything that can wait on I/O runs on the thread pool: this process usually serves the
// device itself, and NBD_DO_IT occupies its thread for as long as the device is connected.

import koffi from 'koffi';
import { SyscallError } from './errno.js';
import { io } from './ioctl-numbers.js';

export const NBD_SET_SOCK = io(0xab, 0);
export const NBD_SET_BLKSIZE = io(0xab, 1);
export const NBD_DO_IT = io(0xab, 3);
export const NBD_CLEAR_SOCK = io(0xab, 4);
export const NBD_SET_SIZE_BLOCKS = io(0xab, 7);
export const NBD_DISCONNECT = io(0xab, 8);
export const NBD_SET_TIMEOUT = io(0xab, 9);
export const NBD_SET_FLAGS = io(0xab, 10);
export const BLKRRPART = io(0x12, 95);
export const BLKFLSBUF = io(0x12, 97);

type IoctlFn = ((fd: number, req: number, arg: number) => number) & { async: (...args: unknown[]) => void };
let ioctlFn: IoctlFn | undefined;

function ioctl(): IoctlFn {
  // ioctl is variadic; declared with a fixed integer argument (same calling convention on the
  // Linux ABIs we support) so that koffi can also call it asynchronously.
  ioctlFn ??= koffi.load('libc.so.6').func('int ioctl(int fd, unsigned long request, unsigned long arg)') as unknown as IoctlFn;
  return ioctlFn;
}

/** ioctl with an integer argument, synchronously: only for calls that never wait on I/O. */
export function ioctlIntSync(fd: number, request: number, arg: number, name: string): number {
  const r = ioctl()(fd, request, arg);
  if (r < 0) throw new SyscallError(`ioctl(${name})`, koffi.errno());
  return r;
}

/** ioctl with an integer argument on the thread pool. */
export function ioctlIntAsync(fd: number, request: number, arg: number, name: string): Promise<number> {
  return new Promise((resolve, reject) => {
    ioctl().async(fd, request, arg, (err: unknown, r: number) => {
      if (err) reject(err);
      // koffi restores the worker thread's errno around this callback.
      else if (r < 0) reject(new SyscallError(`ioctl(${name})`, koffi.errno()));
      else resolve(r);
    });
  });
}

/** Re-read the partition table (EBUSY while a partition is in use). */
export function rereadPartitions(fd: number): Promise<number> {
  return ioctlIntAsync(fd, BLKRRPART, 0, 'BLKRRPART');
}

/** Write back and drop the device's buffer cache. */
export function flushBuffers(fd: number): Promise<number> {
  return ioctlIntAsync(fd, BLKFLSBUF, 0, 'BLKFLSBUF');
}
