// Linux ioctl request numbers for block devices, computed from the _IO/_IOR macros rather than
// copied as magic numbers, so a reader can check them against the headers.
//
// asm-generic/ioctl.h (x86_64, arm64, riscv64 — every architecture we run on):
//   bits  0..7   nr
//   bits  8..15  type
//   bits 16..29  size   (_IOC_SIZEBITS = 14)
//   bits 30..31  dir    (_IOC_NONE = 0, _IOC_WRITE = 1, _IOC_READ = 2)
// linux/fs.h:
//   BLKSSZGET    _IO(0x12,104)             logical sector size (int *arg)
//   BLKGETSIZE64 _IOR(0x12,114,size_t)     device size in bytes (u64 *arg)
//   BLKDISCARD   _IO(0x12,119)             discard range (u64 arg[2] = {offset, length})
//   BLKPBSZGET   _IO(0x12,123)             physical sector size (unsigned int *arg)
//   BLKZEROOUT   _IO(0x12,127)             zero range (u64 arg[2] = {offset, length})
// (BLKSSZGET/BLKPBSZGET/BLKDISCARD/BLKZEROOUT are declared _IO despite taking a pointer.)

export const IOC_NONE = 0;
export const IOC_WRITE = 1;
export const IOC_READ = 2;

/** _IOC(dir, type, nr, size); >>> 0 keeps the result an unsigned 32-bit number. */
export function ioc(dir: number, type: number, nr: number, sizeBytes: number): number {
  return ((dir << 30) | (sizeBytes << 16) | (type << 8) | nr) >>> 0;
}

export function io(type: number, nr: number): number {
  return ioc(IOC_NONE, type, nr, 0);
}

export function ior(type: number, nr: number, sizeBytes: number): number {
  return ioc(IOC_READ, type, nr, sizeBytes);
}

/** sizeof(size_t) on the 64-bit Linux targets we support. */
const SIZEOF_SIZE_T = 8;

export const BLKSSZGET = io(0x12, 104);
export const BLKGETSIZE64 = ior(0x12, 114, SIZEOF_SIZE_T);
export const BLKDISCARD = io(0x12, 119);
export const BLKPBSZGET = io(0x12, 123);
export const BLKZEROOUT = io(0x12, 127);
