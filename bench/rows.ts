// The benchmark rows: what each client does against an export.

export interface Row {
  readonly id: string;
  readonly label: string;
  readonly unit: 'GiB/s' | 'IOPS';
  readonly client: 'nbdcopy-read' | 'nbdcopy-write' | 'fio';
  readonly rw?: 'randread' | 'randwrite';
  readonly iodepth?: number;
  /** The image format served (default raw). qcow2 rows run against imgbd and qemu-nbd only. */
  readonly format?: 'raw' | 'qcow2';
  /** Each measurement gets a freshly created, empty image (writes allocate clusters). */
  readonly fresh?: boolean;
}

export const ROWS: readonly Row[] = [
  { id: 'seq-read', label: 'sequential read (nbdcopy)', unit: 'GiB/s', client: 'nbdcopy-read' },
  { id: 'seq-write', label: 'sequential write (nbdcopy)', unit: 'GiB/s', client: 'nbdcopy-write' },
  { id: 'randread-qd1', label: '4K random read QD1 (fio)', unit: 'IOPS', client: 'fio', rw: 'randread', iodepth: 1 },
  { id: 'randread-qd16', label: '4K random read QD16 (fio)', unit: 'IOPS', client: 'fio', rw: 'randread', iodepth: 16 },
  { id: 'randread-qd64', label: '4K random read QD64 (fio)', unit: 'IOPS', client: 'fio', rw: 'randread', iodepth: 64 },
  { id: 'randwrite-qd16', label: '4K random write QD16 (fio)', unit: 'IOPS', client: 'fio', rw: 'randwrite', iodepth: 16 },
  { id: 'qcow2-seq-read', label: 'qcow2 sequential read (nbdcopy)', unit: 'GiB/s', client: 'nbdcopy-read', format: 'qcow2' },
  { id: 'qcow2-randread-qd1', label: 'qcow2 4K random read QD1 (fio)', unit: 'IOPS', client: 'fio', rw: 'randread', iodepth: 1, format: 'qcow2' },
  { id: 'qcow2-randread-qd16', label: 'qcow2 4K random read QD16 (fio)', unit: 'IOPS', client: 'fio', rw: 'randread', iodepth: 16, format: 'qcow2' },
  { id: 'qcow2-randread-qd64', label: 'qcow2 4K random read QD64 (fio)', unit: 'IOPS', client: 'fio', rw: 'randread', iodepth: 64, format: 'qcow2' },
  { id: 'qcow2-seq-write-fresh', label: 'qcow2 sequential write, fresh image (nbdcopy)', unit: 'GiB/s', client: 'nbdcopy-write', format: 'qcow2', fresh: true },
  { id: 'qcow2-randwrite-fresh', label: 'qcow2 4K random write QD16, fresh image (fio)', unit: 'IOPS', client: 'fio', rw: 'randwrite', iodepth: 16, format: 'qcow2', fresh: true },
];

/** Servers that take part in a row: qcow2 is compared with qemu-nbd, its reference. */
export function serversFor<K extends string>(row: Row, all: readonly K[]): K[] {
  return row.format === 'qcow2' ? all.filter((k) => k === 'imgbd' || k === 'qemu-nbd') : [...all];
}
