// Root filesystem and attach specs: `nbd:IMAGE[:PART]` for containers and bare `IMAGE[:PART]`
// for attach, where PART is a partition number (`:1`) or a GPT partition name (`:name=root`).
//
// The rule for ':' (decided once, here): the selector is the suffix `:name=...` (from the first
// occurrence of ":name=", so a name may itself contain ':') or else a trailing `:N` of decimal
// digits. Whatever remains is the image path and must not contain ':', because then it is
// impossible to tell a path like `/img/a:2` from partition 2 of `/img/a`; such a path is
// refused with the advice to rename it or reach it through a symlink without ':'.

import { UsageError } from '../errors.js';
import type { PartitionSelector } from '../partition/table.js';

export type { PartitionSelector } from '../partition/table.js';

export interface ImageSpec {
  /** The image path, exactly as given (relative paths stay relative). */
  readonly image: string;
  /** Absent: the whole image is the filesystem. */
  readonly partition?: PartitionSelector;
}

/** Linux numbers at most this many partitions per disk (DISK_MAX_PARTS). */
export const MAX_PARTITION_NUMBER = 256;

const NAME_SELECTOR = ':name=';
const NUMBER_SUFFIX = /:([0-9]+)$/;

/** Parse a bare `IMAGE[:N | :name=NAME]` (the attach form). */
export function parseImageSpec(spec: string): ImageSpec {
  let image = spec;
  let partition: PartitionSelector | undefined;
  const nameAt = spec.indexOf(NAME_SELECTOR);
  if (nameAt >= 0) {
    image = spec.slice(0, nameAt);
    const name = spec.slice(nameAt + NAME_SELECTOR.length);
    if (name === '') throw new UsageError(`${JSON.stringify(spec)}: empty partition name after ":name="`);
    // GPT names are at most 36 UTF-16 code units (72 bytes); a longer one can never match.
    if (name.length > 36) throw new UsageError(`${JSON.stringify(spec)}: partition name is longer than GPT's 36 characters`);
    partition = { name };
  } else {
    const m = NUMBER_SUFFIX.exec(spec);
    if (m) {
      image = spec.slice(0, m.index);
      const n = Number(m[1]);
      if (!/^[1-9][0-9]*$/.test(m[1]) || n > MAX_PARTITION_NUMBER) {
        throw new UsageError(`${JSON.stringify(spec)}: partition number ${m[1]} is not in 1..${MAX_PARTITION_NUMBER}`);
      }
      partition = n;
    }
  }
  if (image === '') throw new UsageError(`${JSON.stringify(spec)}: no image path`);
  if (image.includes(':')) {
    throw new UsageError(
      `${JSON.stringify(spec)} is ambiguous: the image path ${JSON.stringify(image)} contains ':', ` +
        `and a partition is selected only by a final ":N" or ":name=NAME"; ` +
        `rename the image or use a symlink to it whose path has no ':'`,
    );
  }
  return partition === undefined ? { image } : { image, partition };
}

/** Parse a container root filesystem spec `nbd:IMAGE[:N | :name=NAME]`. */
export function parseNbdRootSpec(spec: string): ImageSpec {
  if (/^nbd(\+unix|s|s\+unix)?:\/\//.test(spec)) {
    throw new UsageError(`${JSON.stringify(spec)}: NBD URIs are not accepted as a root filesystem; give an image file as nbd:/path/to/image[:PART]`);
  }
  if (!spec.startsWith('nbd:')) throw new UsageError(`${JSON.stringify(spec)}: a root filesystem spec starts with "nbd:", e.g. nbd:/path/disk.qcow2:1`);
  return parseImageSpec(spec.slice('nbd:'.length));
}
