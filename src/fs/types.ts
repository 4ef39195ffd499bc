// What a filesystem probe reports: the type under the name mount(8) and blkid use, and the
// label and UUID formatted the way blkid prints them.

export type FilesystemType =
  | 'ext2'
  | 'ext3'
  | 'ext4'
  | 'ext4dev'
  | 'jbd'
  | 'xfs'
  | 'btrfs'
  | 'vfat'
  | 'squashfs'
  | 'squashfs3'
  | 'erofs'
  | 'swap'
  | 'swsuspend'
  | 'crypto_LUKS';

export interface ProbeResult {
  readonly type: FilesystemType;
  readonly label?: string;
  readonly uuid?: string;
  /** blkid's VERSION where it helps (FAT12/16/32, LUKS 1/2, squashfs major.minor). */
  readonly version?: string;
}

/** Types that hold no mountable filesystem of their own. */
export const UNMOUNTABLE_TYPES: ReadonlySet<FilesystemType> = new Set(['swap', 'swsuspend', 'crypto_LUKS', 'jbd']);
