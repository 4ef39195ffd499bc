// Synchronous mapping of a guest range to the host bytes that hold it, from the L2 tables
// already in the cache: the zero-copy send (BlockDevice.hostRun) and the cached-read fast path
// (readNow) use it, and it answers null rather than wait for a table to load. Only plain data
// qualifies: compressed clusters, zero or unallocated (sub)clusters go the ordinary way.

import type { HostRun } from '../../block/device.js';
import { CorruptImageError } from '../../errors.js';
import { decodeL2Entry, SUB_DATA, subclusterStatus, type Qcow2Geometry } from './map.js';

export interface HostRunSource {
  readonly geometry: Qcow2Geometry;
  /** Host offset of each L2 table (0: none). */
  readonly l1Offsets: readonly number[];
  /** The L2 table at a host offset if it is cached, without loading it. */
  peekTable(hostOffset: number): Buffer | undefined;
  readonly fileEnd: number;
  readonly dataFd: number;
  /** Throws CorruptImageError when a data cluster overlaps metadata. */
  checkDataCluster(hostOffset: number, cluster: number): void;
  /** The host-contiguous data clusters from `cluster` on (at most `max`), checked; null: decode them one by one. */
  dataRun?(cluster: number, max: number): { readonly host: number; readonly count: number } | null;
}

/**
 * The host run that [offset, offset+length) starts with: its first bytes up to where the data
 * stops being plain, host-contiguous and cached. Null when the first byte already does not
 * qualify. Anything corrupt is left for the ordinary path to report.
 */
export function mapHostRun(src: HostRunSource, offset: number, length: number): HostRun | null {
  const g = src.geometry;
  let host = -1;
  let done = 0;
  try {
    while (done < length) {
      const guest = offset + done;
      const cluster = Math.floor(guest / g.clusterSize);
      const l2Offset = src.l1Offsets[Math.floor(cluster / g.l2Entries)] ?? 0;
      const table = l2Offset === 0 ? undefined : src.peekTable(l2Offset);
      if (table === undefined) break;
      const inCluster = guest - cluster * g.clusterSize;
      const run = src.dataRun?.(cluster, Math.ceil((inCluster + length - done) / g.clusterSize));
      if (run) {
        const at = run.host + inCluster;
        if (host < 0) host = at;
        else if (at !== host + done) break;
        done += Math.min(length - done, run.count * g.clusterSize - inCluster);
        continue;
      }
      const e = decodeL2Entry(g, table, cluster % g.l2Entries, src.fileEnd);
      if (!e.hasHost || e.compressed) break;
      if (!g.externalData) src.checkDataCluster(e.hostOffset, cluster);
      let end = inCluster;
      const limit = Math.min(g.clusterSize, inCluster + (length - done));
      while (end < limit && subclusterStatus(e, Math.floor(end / g.subclusterSize)) === SUB_DATA) {
        end = Math.min(limit, (Math.floor(end / g.subclusterSize) + 1) * g.subclusterSize);
      }
      if (end === inCluster) break;
      const at = e.hostOffset + inCluster;
      if (host < 0) host = at;
      else if (at !== host + done) break;
      done += end - inCluster;
      if (end < limit) break;
    }
  } catch (e) {
    if (!(e instanceof CorruptImageError)) throw e;
    return null;
  }
  return host < 0 ? null : { fd: src.dataFd, offset: host, length: done };
}
