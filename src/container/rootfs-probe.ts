// Which filesystem the container root is, read from the image before anything is attached:
// a bad spec, a missing partition or an unmountable volume fails with nothing to undo. The
// same bytes are what the kernel will see through /dev/nbdN (the supervisor exports exactly
// this partition).

import type { BlockDevice } from '../block/device.js';
import { offsetFilter } from '../block/filters/offset.js';
import { UsageError } from '../errors.js';
import { openImageWithFormat } from '../formats/open.js';
import { probeMountableFilesystem } from '../fs/probe.js';
import { findPartition, readPartitions } from '../partition/table.js';
import type { ImageSpec } from './spec.js';

export interface RootProbe {
  readonly fstype: string;
  readonly format: string;
}

export async function probeRootFilesystem(spec: ImageSpec, format: string | undefined, allowBacking?: readonly string[]): Promise<RootProbe> {
  const opened = await openImageWithFormat(spec.image, {
    readOnly: true,
    ...(format !== undefined && { format }),
    ...(allowBacking !== undefined && allowBacking.length > 0 && { allowBacking }),
  });
  try {
    let volume: BlockDevice = opened.device;
    let what = spec.image;
    if (spec.partition !== undefined) {
      const { partition } = await findPartition(opened.device, spec.partition);
      volume = offsetFilter(opened.device, { offsetBytes: partition.startBytes, sizeBytes: partition.sizeBytes });
      what = `partition ${partition.number} of ${spec.image}`;
    } else {
      const table = await readPartitions(opened.device).catch(() => null);
      if (table && table.partitions.length > 0) {
        throw new UsageError(`${spec.image} has a ${table.scheme.toUpperCase()} partition table: name the root partition (nbd:${spec.image}:N)`);
      }
    }
    return { fstype: (await probeMountableFilesystem(volume, what)).type, format: opened.format };
  } finally {
    await opened.device.close();
  }
}
