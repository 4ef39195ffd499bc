// A writer for the cpio "newc" archive format the kernel unpacks as an initramfs
// (Documentation/driver-api/early-userspace/buffer-format.rst). Pure: entries in, bytes out.
//
// Each entry: a 110-byte ASCII header, the NUL-terminated name padded to 4 bytes, then the
// data padded to 4 bytes. The archive ends with the entry "TRAILER!!!".
//
//   off  len  field (8 hex digits each after the 6-byte magic "070701")
//     0    6  magic
//     6    8  ino        14  mode      22  uid       30  gid       38  nlink
//    46    8  mtime      54  filesize  62  devmajor  70  devminor  78  rdevmajor
//    86    8  rdevminor  94  namesize (including the NUL)           102  check (0)

export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;
export const S_IFCHR = 0o020000;

export type CpioEntry =
  | { readonly kind: 'dir'; readonly path: string; readonly mode?: number }
  | { readonly kind: 'file'; readonly path: string; readonly data: Uint8Array; readonly mode?: number }
  | { readonly kind: 'symlink'; readonly path: string; readonly target: string }
  | { readonly kind: 'chardev'; readonly path: string; readonly major: number; readonly minor: number; readonly mode?: number };

const HEADER_BYTES = 110;

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

function hex8(n: number): string {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new RangeError(`cpio field out of range: ${n}`);
  return n.toString(16).padStart(8, '0');
}

function header(ino: number, mode: number, fileBytes: number, rdev: [number, number], nameBytes: number): string {
  return (
    '070701' +
    [ino, mode, 0, 0, 1, 0, fileBytes, 0, 0, rdev[0], rdev[1], nameBytes, 0].map(hex8).join('')
  );
}

/** Encode entries (parents before children, paths without a leading slash) as one archive. */
export function encodeCpioNewc(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  const push = (mode: number, path: string, data: Uint8Array, rdev: [number, number]) => {
    const name = Buffer.from(`${path}\0`, 'utf8');
    const head = Buffer.from(header(ino++, mode, data.length, rdev, name.length), 'ascii');
    parts.push(head, name, Buffer.alloc(pad4(HEADER_BYTES + name.length)));
    parts.push(Buffer.from(data.buffer, data.byteOffset, data.byteLength), Buffer.alloc(pad4(data.length)));
  };
  for (const e of entries) {
    if (e.path.startsWith('/') || e.path === '') throw new RangeError(`cpio path must be relative: ${e.path}`);
    switch (e.kind) {
      case 'dir':
        push(S_IFDIR | (e.mode ?? 0o755), e.path, new Uint8Array(0), [0, 0]);
        break;
      case 'file':
        push(S_IFREG | (e.mode ?? 0o644), e.path, e.data, [0, 0]);
        break;
      case 'symlink':
        push(S_IFLNK | 0o777, e.path, Buffer.from(e.target, 'utf8'), [0, 0]);
        break;
      case 'chardev':
        push(S_IFCHR | (e.mode ?? 0o600), e.path, new Uint8Array(0), [e.major, e.minor]);
        break;
    }
  }
  push(0, 'TRAILER!!!', new Uint8Array(0), [0, 0]);
  return Buffer.concat(parts);
}
