// QED consistency check and repair (qed_spec.rst, "Consistency checking"; QEMU block/qed-check.c),
// run when a writable open finds QED_F_NEED_CHECK set. Invariants: every cluster is referenced
// at most once; table and data offsets are cluster aligned, past the header and inside the file.
//
// Repair, as QEMU does it: an entry that breaks the offset rules is cleared (the cluster becomes
// unallocated). Beyond QEMU, unreferenced clusters at the tail of the file (what a crash between
// appending data and linking it leaves) are truncated away. A cluster referenced twice cannot be
// repaired without choosing whose data to lose, so it is reported and the caller refuses to write.
//
// Work and memory are bounded by the file: one bit per cluster, and each table is read at most
// once because a table reached twice is a duplicate reference and is not descended into again.

import type { HostFile } from '../../io/host-file.js';
import { isValidClusterOffset, isValidTableOffset, readQedEntry, writeQedEntry, type QedGeometry } from './map.js';
import { QED_ZERO_CLUSTER } from './header.js';

export interface QedCheckResult {
  /** Invalid entries found (cleared when fixing). */
  readonly invalidEntries: number;
  /** Clusters referenced more than once: not repairable. */
  readonly duplicateReferences: number;
  /** Clusters no table references, before any truncation. */
  readonly leakedClusters: number;
  /** File size after repair (cluster aligned); equal to the scanned size without `fix`. */
  readonly fileEnd: number;
  /** First problems found, for error messages. */
  readonly problems: readonly string[];
}

export interface QedCheckInput {
  readonly file: HostFile;
  readonly geometry: QedGeometry;
  readonly l1TableOffset: number;
  /** The whole L1 table; cleared entries are written back into it when fixing. */
  readonly l1: Buffer;
  readonly fileSize: number;
  readonly fix: boolean;
}

const MAX_PROBLEMS = 8;

export async function checkQed(input: QedCheckInput): Promise<QedCheckResult> {
  const { file, geometry: g, l1, fix } = input;
  const cs = g.clusterSize;
  const fileEnd = Math.floor(input.fileSize / cs) * cs;
  const nclusters = fileEnd / cs;
  const used = new Uint8Array(Math.ceil(nclusters / 8));
  const problems: string[] = [];
  const note = (p: string): void => {
    if (problems.length < MAX_PROBLEMS) problems.push(p);
  };
  let invalidEntries = 0;
  let duplicateReferences = 0;

  /** Mark `count` clusters from `offset` used; false when one already was. */
  const mark = (offset: number, count: number): boolean => {
    const first = offset / cs;
    let fresh = true;
    for (let c = first; c < first + count && c < nclusters; c++) {
      const bit = 1 << (c & 7);
      if (used[c >>> 3]! & bit) fresh = false;
      else used[c >>> 3]! |= bit;
    }
    return fresh;
  };
  mark(0, g.headerBytes / cs);
  mark(input.l1TableOffset, g.tableBytes / cs);

  let l1Dirty = false;
  const l2 = Buffer.allocUnsafe(g.tableBytes);
  for (let i = 0; i < g.tableEntries; i++) {
    const l2Offset = readQedEntry(l1, i);
    if (l2Offset === 0) continue;
    if (!isValidTableOffset(g, l2Offset, fileEnd)) {
      invalidEntries++;
      note(`L1[${i}] = ${l2Offset} is not a valid L2 table offset`);
      if (fix) {
        writeQedEntry(l1, i, 0);
        l1Dirty = true;
      }
      continue;
    }
    if (!mark(l2Offset, g.tableBytes / cs)) {
      duplicateReferences++;
      note(`L2 table at ${l2Offset} (L1[${i}]) overlaps another table or cluster`);
      continue;
    }
    await file.pread(l2, l2Offset);
    let l2Dirty = false;
    for (let j = 0; j < g.tableEntries; j++) {
      const off = readQedEntry(l2, j);
      if (off === 0 || off === QED_ZERO_CLUSTER) continue;
      if (!isValidClusterOffset(g, off, fileEnd)) {
        invalidEntries++;
        note(`L2[${i}][${j}] = ${off} is not a valid data cluster offset`);
        if (fix) {
          writeQedEntry(l2, j, 0);
          l2Dirty = true;
        }
        continue;
      }
      if (!mark(off, 1)) {
        duplicateReferences++;
        note(`data cluster at ${off} (L2[${i}][${j}]) is referenced more than once`);
      }
    }
    if (l2Dirty) await file.pwrite(l2, l2Offset);
  }
  if (l1Dirty) await file.pwrite(l1, input.l1TableOffset);

  let leakedClusters = 0;
  let lastUsed = -1;
  for (let c = 0; c < nclusters; c++) {
    if (used[c >>> 3]! & (1 << (c & 7))) lastUsed = c;
    else leakedClusters++;
  }
  let end = fileEnd;
  if (fix) {
    // The tail past the last referenced cluster holds nothing: drop it so the file ends where
    // the metadata does, and the next allocation appends right there.
    if (duplicateReferences === 0 && (lastUsed + 1) * cs < input.fileSize) {
      end = (lastUsed + 1) * cs;
      await file.truncate(end);
    }
    await file.datasync();
  }
  return { invalidEntries, duplicateReferences, leakedClusters, fileEnd: end, problems };
}
