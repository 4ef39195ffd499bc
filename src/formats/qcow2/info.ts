// What `qemu-img info --output=json` says about a qcow2 image, with qemu-img's key names and
// order (qemu-img.rst, "info"): the format-specific block, the dirty flag and the snapshot list.

import { QCOW2_AUTOCLEAR, QCOW2_COMPAT_LAZY_REFCOUNTS, QCOW2_INCOMPAT, type Qcow2Header } from './header.js';
import type { Qcow2Snapshot } from './snapshot.js';

export interface Qcow2Info {
  readonly formatSpecific: { readonly type: 'qcow2'; readonly data: Record<string, unknown> };
  readonly dirtyFlag: boolean;
  readonly snapshots: Record<string, unknown>[];
}

export function describeQcow2(h: Qcow2Header, snapshots: readonly Qcow2Snapshot[]): Qcow2Info {
  const data: Record<string, unknown> = {};
  data.compat = h.version === 2 ? '0.10' : '1.1';
  data['compression-type'] = h.compressionType === 1 ? 'zstd' : 'zlib';
  if (h.version === 3) data['lazy-refcounts'] = (h.compatibleFeatures & QCOW2_COMPAT_LAZY_REFCOUNTS) !== 0n;
  data['refcount-bits'] = 2 ** h.refcountOrder;
  if ((h.incompatibleFeatures & QCOW2_INCOMPAT.DATA_FILE) !== 0n) {
    if (h.dataFile !== null) data['data-file'] = h.dataFile;
    data['data-file-raw'] = (h.autoclearFeatures & QCOW2_AUTOCLEAR.DATA_FILE_RAW) !== 0n;
  }
  if (h.version === 3) {
    data.corrupt = (h.incompatibleFeatures & QCOW2_INCOMPAT.CORRUPT) !== 0n;
    data['extended-l2'] = (h.incompatibleFeatures & QCOW2_INCOMPAT.EXTL2) !== 0n;
  }
  return {
    formatSpecific: { type: 'qcow2', data },
    dirtyFlag: (h.incompatibleFeatures & QCOW2_INCOMPAT.DIRTY) !== 0n,
    snapshots: snapshots.map((s) => {
      const o: Record<string, unknown> = {};
      if (s.icount !== null && s.icount >= 0n) o.icount = Number(s.icount);
      o['vm-clock-nsec'] = Number(s.vmClockNsec % 1_000_000_000n);
      o.name = s.name;
      o['date-sec'] = s.dateSec;
      o['date-nsec'] = s.dateNsec;
      o['vm-clock-sec'] = Number(s.vmClockNsec / 1_000_000_000n);
      o.id = s.id;
      o['vm-state-size'] = s.vmStateSize;
      return o;
    }),
  };
}
