// QED logical-to-file translation (qed_spec.rst, "Tables"): table entries, the split of a guest
// offset into L1 index / L2 index / byte offset, and the validity rules for table and data
// cluster offsets that every lookup applies (an on-disk offset is never trusted).

export interface QedGeometry {
  readonly clusterSize: number;
  readonly tableBytes: number;
  /** TABLE_NOFFSETS */
  readonly tableEntries: number;
  /** Guest bytes mapped by one L2 table. */
  readonly l2SpanBytes: number;
  /** First byte after the header area: no table or data cluster may start below it. */
  readonly headerBytes: number;
}

export function makeQedGeometry(clusterSize: number, tableSize: number, headerSize: number): QedGeometry {
  const tableBytes = clusterSize * tableSize;
  const tableEntries = tableBytes / 8;
  return { clusterSize, tableBytes, tableEntries, l2SpanBytes: tableEntries * clusterSize, headerBytes: headerSize * clusterSize };
}

/** An entry that cannot be a safe integer offset reads as -1, which no validity check accepts. */
export function readQedEntry(table: Buffer, index: number): number {
  const lo = table.readUInt32LE(index * 8);
  const hi = table.readUInt32LE(index * 8 + 4);
  if (hi > 0x1fffff) return -1;
  return hi * 0x1_0000_0000 + lo;
}

export function writeQedEntry(table: Buffer, index: number, value: number): void {
  table.writeUInt32LE(value >>> 0, index * 8);
  table.writeUInt32LE(Math.floor(value / 0x1_0000_0000), index * 8 + 4);
}

/**
 * A data cluster offset that may be read: "L1, L2, and data cluster offsets must be aligned to
 * header.cluster_size", past the header, and inside the file (`fileEnd` is cluster aligned).
 */
export function isValidClusterOffset(g: QedGeometry, offset: number, fileEnd: number): boolean {
  return offset > 0 && offset % g.clusterSize === 0 && offset >= g.headerBytes && offset + g.clusterSize <= fileEnd;
}

/** "Table offsets must at least table_size * cluster_size bytes from the end of the image file." */
export function isValidTableOffset(g: QedGeometry, offset: number, fileEnd: number): boolean {
  return offset > 0 && offset % g.clusterSize === 0 && offset >= g.headerBytes && offset + g.tableBytes <= fileEnd;
}

/** How a guest cluster is stored. */
export type QedClusterState =
  | { readonly kind: 'unallocated' }
  | { readonly kind: 'zero' }
  | { readonly kind: 'data'; readonly hostOffset: number };

export const UNALLOCATED: QedClusterState = { kind: 'unallocated' };
export const ZERO: QedClusterState = { kind: 'zero' };
