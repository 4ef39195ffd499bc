// The internal snapshot table (qcow2.txt, "Snapshots"): reading and validating every entry.
//
// Snapshot table entry (big-endian, padded to a multiple of 8 bytes):
//    0  8  l1_table_offset (bytes, cluster aligned)
//    8  4  l1_size (entries)
//   12  2  id_str_size (bytes)
//   14  2  name_size (bytes)
//   16  4  date_sec
//   20  4  date_nsec
//   24  8  vm_clock_nsec
//   32  4  vm_state_size (32-bit, superseded by extra data bytes 40-47)
//   36  4  extra_data_size (bytes)
//   40  .  extra data: [0-7] vm_state_size_large, [8-15] disk_size, [16-23] icount
//    .  .  id string, then name string (not NUL terminated)

import { CorruptImageError } from '../../errors.js';
import type { HostFile } from '../../io/host-file.js';
import { readU64OrNull } from '../../util/u64.js';
import { QCOW2_MAX_L1_BYTES } from './header.js';

/** QEMU's limits (QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS_SIZE). */
export const QCOW2_MAX_SNAPSHOT_EXTRA_BYTES = 1024;
export const QCOW2_MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;

export interface Qcow2Snapshot {
  readonly l1TableOffset: number;
  readonly l1Size: number;
  readonly id: string;
  readonly name: string;
  readonly dateSec: number;
  readonly dateNsec: number;
  readonly vmClockNsec: bigint;
  readonly vmStateSize: number;
  /** Virtual disk size when the snapshot was taken, when recorded. */
  readonly diskSizeBytes: number | null;
  readonly icount: bigint | null;
  readonly extraData: Buffer;
}

export interface SnapshotTable {
  readonly snapshots: Qcow2Snapshot[];
  /** Bytes the table occupies on disk. */
  readonly tableBytes: number;
}

export async function readSnapshotTable(
  file: HostFile,
  offset: number,
  count: number,
  clusterSize: number,
  fileSize: number,
  fixed: readonly { what: string; start: number; end: number }[],
): Promise<SnapshotTable> {
  const snapshots: Qcow2Snapshot[] = [];
  let pos = offset;
  const head = Buffer.alloc(40);
  for (let i = 0; i < count; i++) {
    if (pos + 40 > fileSize) throw new CorruptImageError(`qcow2: snapshot table entry ${i} is past end of file`);
    await file.pread(head, pos);
    const l1TableOffset = readU64OrNull(head, 0);
    const l1Size = head.readUInt32BE(8);
    const idSize = head.readUInt16BE(12);
    const nameSize = head.readUInt16BE(14);
    const extraSize = head.readUInt32BE(36);
    if (extraSize > QCOW2_MAX_SNAPSHOT_EXTRA_BYTES) throw new CorruptImageError(`qcow2: snapshot ${i} has ${extraSize} bytes of extra data`);
    const varBytes = extraSize + idSize + nameSize;
    const entryBytes = Math.ceil((40 + varBytes) / 8) * 8;
    if (pos + entryBytes - offset > QCOW2_MAX_SNAPSHOT_TABLE_BYTES) throw new CorruptImageError('qcow2: snapshot table is too large');
    if (pos + 40 + varBytes > fileSize) throw new CorruptImageError(`qcow2: snapshot table entry ${i} is past end of file`);
    const rest = Buffer.alloc(varBytes);
    await file.pread(rest, pos + 40);
    if (l1TableOffset === null || l1TableOffset % clusterSize !== 0) throw new CorruptImageError(`qcow2: snapshot ${i} L1 table offset is not cluster aligned`);
    if (l1Size * 8 > QCOW2_MAX_L1_BYTES) throw new CorruptImageError(`qcow2: snapshot ${i} L1 table is too large`);
    if (l1Size > 0 && (l1TableOffset === 0 || l1TableOffset + l1Size * 8 > fileSize)) throw new CorruptImageError(`qcow2: snapshot ${i} L1 table is outside the image file`);
    const extra = rest.subarray(0, extraSize);
    snapshots.push({
      l1TableOffset,
      l1Size,
      id: rest.subarray(extraSize, extraSize + idSize).toString('utf8'),
      name: rest.subarray(extraSize + idSize, varBytes).toString('utf8'),
      dateSec: head.readUInt32BE(16),
      dateNsec: head.readUInt32BE(20),
      vmClockNsec: head.readBigUInt64BE(24),
      vmStateSize: extraSize >= 8 ? Number(extra.readBigUInt64BE(0)) : head.readUInt32BE(32),
      diskSizeBytes: extraSize >= 16 ? readU64OrNull(extra, 8) : null,
      icount: extraSize >= 24 ? extra.readBigInt64BE(16) : null,
      extraData: Buffer.from(extra),
    });
    pos += entryBytes;
  }
  const tableBytes = pos - offset;
  for (const r of fixed) {
    if (count > 0 && offset < r.end && r.start < offset + tableBytes) throw new CorruptImageError(`qcow2: snapshot table overlaps the ${r.what}`);
  }
  return { snapshots, tableBytes };
}
