// The benchmark rows: what each client does against an export.

export interface Row {
  readonly id: string;
  readonly label: string;
  readonly unit: 'GiB/s' | 'IOPS';
  readonly client: 'nbdcopy-read' | 'nbdcopy-write' | 'fio';
  readonly rw?: 'randread' | 'randwrite';
  readonly iodepth?: number;
}

export const ROWS: readonly Row[] = [
  { id: 'seq-read', label: 'sequential read (nbdcopy)', unit: 'GiB/s', client: 'nbdcopy-read' },
  { id: 'seq-write', label: 'sequential write (nbdcopy)', unit: 'GiB/s', client: 'nbdcopy-write' },
  { id: 'randread-qd1', label: '4K random read QD1 (fio)', unit: 'IOPS', client: 'fio', rw: 'randread', iodepth: 1 },
  { id: 'randread-qd16', label: '4K random read QD16 (fio)', unit: 'IOPS', client: 'fio', rw: 'randread', iodepth: 16 },
  { id: 'randread-qd64', label: '4K random read QD64 (fio)', unit: 'IOPS', client: 'fio', rw: 'randread', iodepth: 64 },
];
