// Waiting until a freshly connected /dev/nbdN is usable without udev: its size is published
// in sysfs, and every partition the table holds has a sysfs entry and a devtmpfs node whose
// device number matches it (a node left from an earlier attach does not count).

import { ImgbdError } from '../errors.js';
import { deviceSizeBytes, kernelPartitions, nodeMatches, SYSTEM_ROOTS, type KernelPartition, type SysRoots } from './device.js';

export class DeviceNotReadyError extends ImgbdError {
  constructor(message: string) {
    super('ERR_DEVICE_NOT_READY', message);
  }
}

export interface ReadyWait {
  readonly index: number;
  /** The exported size; sysfs must show it (in 512-byte sectors, rounded down). */
  readonly sizeBytes: number;
  /** Partition numbers that must appear. */
  readonly partitions: readonly number[];
  readonly timeoutMs: number;
  readonly roots?: SysRoots;
  readonly intervalMs?: number;
}

/** What is still missing, or null when the device is ready. */
export function missingForReady(w: Omit<ReadyWait, 'timeoutMs'>): string | null {
  const roots = w.roots ?? SYSTEM_ROOTS;
  const size = deviceSizeBytes(w.index, roots);
  const want = Math.floor(w.sizeBytes / 512) * 512;
  if (size === null) return `/sys/block/nbd${w.index} is missing`;
  if (size !== want) return `size ${size} bytes (want ${want})`;
  const known = new Map(kernelPartitions(w.index, roots).map((p) => [p.number, p]));
  for (const n of w.partitions) {
    const p = known.get(n);
    if (!p) return `partition ${n} not in sysfs`;
    if (!nodeMatches(p.name, p.devt, roots)) return `/dev/${p.name} missing or not ${p.devt}`;
  }
  return null;
}

export async function waitForDeviceReady(w: ReadyWait): Promise<KernelPartition[]> {
  const deadline = Date.now() + w.timeoutMs;
  for (;;) {
    const missing = missingForReady(w);
    if (missing === null) return kernelPartitions(w.index, w.roots ?? SYSTEM_ROOTS);
    if (Date.now() > deadline) throw new DeviceNotReadyError(`/dev/nbd${w.index} not ready after ${w.timeoutMs} ms: ${missing}`);
    await new Promise((r) => setTimeout(r, w.intervalMs ?? 25));
  }
}
