// Which partition table a device holds and which partition a selector names. The one entry
// point for callers: readPartitions() for listing, findPartition() for "partition 1" or
// "the GPT partition named root" (the spec's `IMAGE:1` / `IMAGE:name=root`).

import type { BlockDevice } from '../block/device.js';
import { UsageError } from '../errors.js';
import { readGpt } from './gpt.js';
import { classifyMbr, readMbr } from './mbr.js';
import { readRange, type Partition, type PartitionTable } from './types.js';

export type { Partition, PartitionTable, PartitionScheme } from './types.js';

export type PartitionSelector = number | { readonly name: string };

/**
 * The selected partition does not exist (or is an extended-partition container); the message
 * lists what does. A usage error (the CLI exits 64: nothing was done) with its own code.
 */
export class PartitionNotFoundError extends UsageError {
  constructor(message: string) {
    super(message);
    (this as { code: string }).code = 'ERR_PARTITION_NOT_FOUND';
  }
}

const SECTOR_SIZES = [512, 4096] as const;

/**
 * Read the partition table. A protective MBR (type 0xEE) means GPT, tried with 512-byte
 * logical blocks first and then 4096 (a 4Kn disk image); anything else with a valid MBR is
 * MBR with 512-byte sectors; otherwise 'none' (the device is one filesystem, or blank).
 */
export async function readPartitions(dev: BlockDevice): Promise<PartitionTable> {
  const none: PartitionTable = { scheme: 'none', sectorBytes: 512, partitions: [], warnings: [] };
  if (dev.sizeBytes < 512) return none;
  const sector0 = await readRange(dev, 0, 512, 'MBR');
  const kind = classifyMbr(sector0);
  if (kind === 'none') return none;
  if (kind === 'mbr') return readMbr(dev, sector0, 512);
  let firstError: unknown;
  for (const sectorBytes of SECTOR_SIZES) {
    try {
      return await readGpt(dev, sectorBytes);
    } catch (e) {
      firstError ??= e;
    }
  }
  throw firstError;
}

function describePartition(p: Partition): string {
  const parts = [`${p.number}`];
  if (p.name !== undefined && p.name !== '') parts.push(`name=${JSON.stringify(p.name)}`);
  parts.push(`type ${p.type}`);
  if (p.extended) parts.push('extended');
  parts.push(`${p.sizeBytes} bytes at ${p.startBytes}`);
  return parts.join(' ');
}

function describeTable(table: PartitionTable): string {
  if (table.partitions.length === 0) return `the ${table.scheme === 'none' ? 'image has no partition table' : `${table.scheme.toUpperCase()} table has no partitions`}`;
  return `the ${table.scheme.toUpperCase()} table has: ${table.partitions.map(describePartition).join('; ')}`;
}

/** Select one partition. Throws PartitionNotFoundError listing the partitions that do exist. */
export async function findPartition(dev: BlockDevice, selector: PartitionSelector): Promise<{ table: PartitionTable; partition: Partition }> {
  const table = await readPartitions(dev);
  if (typeof selector === 'number') {
    const partition = table.partitions.find((p) => p.number === selector);
    if (!partition) throw new PartitionNotFoundError(`no partition ${selector}: ${describeTable(table)}`);
    if (partition.extended) {
      throw new PartitionNotFoundError(`partition ${selector} is an MBR extended partition (a container for logical partitions 5 and up), not a filesystem: ${describeTable(table)}`);
    }
    return { table, partition };
  }
  if (table.scheme !== 'gpt') {
    throw new PartitionNotFoundError(`partition names exist only in GPT tables; select by number instead: ${describeTable(table)}`);
  }
  const matches = table.partitions.filter((p) => p.name === selector.name);
  if (matches.length === 0) throw new PartitionNotFoundError(`no partition named ${JSON.stringify(selector.name)}: ${describeTable(table)}`);
  if (matches.length > 1) {
    throw new PartitionNotFoundError(
      `${matches.length} partitions are named ${JSON.stringify(selector.name)} (${matches.map((p) => p.number).join(', ')}); select one by number`,
    );
  }
  return { table, partition: matches[0] };
}
