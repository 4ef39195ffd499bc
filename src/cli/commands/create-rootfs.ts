// imgbd create --partition gpt|mbr --fs ext4|xfs|vfat [--from-dir DIR] [--label L] IMAGE SIZE:
// a partitioned image with a populated filesystem, in any format. The work is in src/image/rootfs.ts.

import { UsageError } from '../../errors.js';
import { createRootfsImage, type RootfsType } from '../../image/rootfs.js';
import { formatSize, parseSize } from '../parse.js';
import { imageCreateOptionsFor } from './convert.js';

interface RootfsCliOptions {
  format?: string;
  options?: string[];
  backing?: string;
  partition?: string;
  fs?: string;
  fromDir?: string;
  label?: string;
  quiet?: boolean;
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const c = opts as RootfsCliOptions;
  const [image, sizeText] = args as [string, string | undefined];
  if (c.fs === undefined) throw new UsageError('--partition needs --fs ext4|xfs|vfat to put in the partition');
  if (sizeText === undefined) throw new UsageError('a partitioned image needs a SIZE, e.g. imgbd create -f qcow2 --partition gpt --fs ext4 disk.qcow2 1G');
  if (c.backing !== undefined) throw new UsageError('--fs builds a new filesystem: it cannot be combined with -b');
  const partition = c.partition ?? 'gpt';
  if (partition !== 'gpt' && partition !== 'mbr') throw new UsageError(`--partition ${partition}: use gpt or mbr`);
  const format = c.format ?? 'raw';
  const sizeBytes = parseSize(sizeText);
  const r = await createRootfsImage({
    image,
    format,
    sizeBytes,
    partition,
    fs: c.fs as RootfsType,
    fromDir: c.fromDir,
    label: c.label,
    create: imageCreateOptionsFor(format, c.options ?? []),
  });
  if (!c.quiet) {
    process.stdout.write(
      `Formatting '${image}', fmt=${format} size=${sizeBytes} (${formatSize(sizeBytes)}), ${r.partition} partition 1 at ${r.partitionOffsetBytes} ` +
        `(${formatSize(r.partitionSizeBytes)}) with ${c.fs}${c.fromDir !== undefined ? ` from ${c.fromDir}` : ''}\n`,
    );
  }
  return 0;
}
