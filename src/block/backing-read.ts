// Reading the part of a range that an overlay does not hold from its backing device. A backing
// file shorter than the overlay reads as zeros past its end (qcow2.txt, qed_spec.rst).

import type { BlockDevice } from './device.js';

export async function readFromBacking(backing: BlockDevice | null, buf: Buffer, offset: number): Promise<void> {
  const have = backing === null ? 0 : Math.max(0, Math.min(buf.length, backing.sizeBytes - offset));
  if (have > 0) await backing!.pread(buf.subarray(0, have), offset);
  if (have < buf.length) buf.fill(0, have);
}
