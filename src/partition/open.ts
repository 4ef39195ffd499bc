// One partition of a disk as a device of its own: the selected partition's window of the
// disk through the offset filter, so it can be exported, probed and mounted even when the
// kernel was loaded with max_part=0 and makes no partition devices.

import type { BlockDevice } from '../block/device.js';
import { offsetFilter } from '../block/filters/offset.js';
import { findPartition, type Partition, type PartitionSelector, type PartitionTable } from './table.js';

export interface OpenedPartition {
  /** The partition's bytes, offset 0 being its first byte. Closing it closes the disk. */
  readonly device: BlockDevice;
  readonly partition: Partition;
  readonly table: PartitionTable;
}

export async function openPartition(disk: BlockDevice, selector: PartitionSelector): Promise<OpenedPartition> {
  const { table, partition } = await findPartition(disk, selector);
  const device = offsetFilter(disk, { offsetBytes: partition.startBytes, sizeBytes: partition.sizeBytes });
  return { device, partition, table };
}
