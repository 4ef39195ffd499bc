// statfs(2) f_type values (linux/magic.h) of the file systems imgbd treats differently.

export const EXT4_SUPER_MAGIC = 0xef53;
export const XFS_SUPER_MAGIC = 0x58465342;
export const TMPFS_MAGIC = 0x01021994;
export const RAMFS_MAGIC = 0x858458f6;

/** Files live in memory: reading and writing them copies pages and never waits for a disk. */
export function isMemoryFilesystem(type: number): boolean {
  return type === TMPFS_MAGIC || type === RAMFS_MAGIC;
}
