// The partition list every table reader (mbr.ts, gpt.ts) produces, numbered the way Linux
// numbers the partition devices (sda1, sda5, ...), and the bounded-read helper they share.

import type { BlockDevice } from '../block/device.js';
import { CorruptImageError } from '../errors.js';

export type PartitionScheme = 'mbr' | 'gpt' | 'none';

export interface Partition {
  /** The Linux partition number: MBR slot 1-4, logical 5+; GPT entry index + 1. */
  readonly number: number;
  readonly startBytes: number;
  readonly sizeBytes: number;
  /** MBR: the system id as two lower-case hex digits ("83"); GPT: the type GUID, lower case. */
  readonly type: string;
  /** GPT partition name (UTF-16LE on disk). */
  readonly name?: string;
  /** GPT: the unique partition GUID; MBR: the kernel's PARTUUID ("disksig-NN"). */
  readonly uuid?: string;
  /** MBR: boot indicator 0x80; GPT: attribute bit 2 (legacy BIOS bootable). */
  readonly bootable?: boolean;
  /** GPT attribute bits (bit 0 required, bit 2 legacy BIOS bootable, 48-63 type-specific). */
  readonly attributes?: bigint;
  /** MBR extended partition: a container for logical partitions, holding no filesystem. */
  readonly extended?: boolean;
}

export interface PartitionTable {
  readonly scheme: PartitionScheme;
  /** Logical sector size the table's LBAs are counted in. */
  readonly sectorBytes: number;
  readonly partitions: readonly Partition[];
  /** MBR: disk signature as 0x-prefixed hex; GPT: disk GUID. */
  readonly diskId?: string;
  /** Problems that did not prevent reading the table (e.g. primary GPT header corrupt, backup used). */
  readonly warnings: readonly string[];
}

/**
 * Read `length` bytes at `offset`, refusing ranges outside the device: every offset here
 * comes from on-disk data, and a read past the end must be a corrupt-table error, not EINVAL.
 */
export async function readRange(dev: BlockDevice, offset: number, length: number, what: string): Promise<Buffer> {
  if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > dev.sizeBytes) {
    throw new CorruptImageError(`${what} at byte ${offset} (+${length}) lies outside the ${dev.sizeBytes}-byte device`);
  }
  const buf = Buffer.alloc(length);
  await dev.pread(buf, offset);
  return buf;
}
