// measure: the file size a new image needs (qemu-img.rst "measure"), computed as QEMU does
// (block/qcow2.c qcow2_measure and qcow2_calc_prealloc_size, block/file-posix.c raw_measure) so
// the numbers are equal: `required` for the source's data (or an empty image of --size),
// `fully-allocated` for every cluster written.

import { EXTENT_ZERO, type BlockDevice } from '../block/device.js';
import { walkExtents } from '../block/walk.js';
import { UnsupportedImageError, UsageError } from '../errors.js';
import type { Qcow2CreateOptions } from '../formats/qcow2/index.js';

export interface MeasureResult {
  readonly required: number;
  readonly 'fully-allocated': number;
  /** qcow2 v3 targets measuring a source that can hold bitmaps (qcow2): bytes of bitmaps (0). */
  readonly bitmaps?: number;
}

export interface MeasureInput {
  /** The source to convert; its data ranges count. */
  readonly source?: BlockDevice;
  readonly sourceFormat?: string;
  /** A new empty image of this size instead of a source. */
  readonly sizeBytes?: number;
  readonly format: string;
  readonly qcow2?: Omit<Qcow2CreateOptions, 'sizeBytes'>;
}

const roundUp = (x: number, a: number): number => Math.ceil(x / a) * a;
const divRoundUp = (x: number, a: number): number => Math.ceil(x / a);

/** QEMU qcow2_refcount_metadata_size: refcount blocks and table for `clusters`, to the fixed point. */
export function qcow2RefcountMetadataBytes(clusters: number, clusterSize: number, refcountOrder: number): number {
  const blocksPerTableCluster = clusterSize / 8;
  const refcountsPerBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = divRoundUp(clusters + table + blocks, refcountsPerBlock);
    table = divRoundUp(blocks, blocksPerTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** QEMU qcow2_calc_prealloc_size: every cluster of a fully allocated image, metadata included. */
export function qcow2FullSize(totalBytes: number, clusterSize: number, refcountOrder: number, extendedL2: boolean): number {
  const aligned = roundUp(totalBytes, clusterSize);
  const l2eBytes = extendedL2 ? 16 : 8;
  let meta = clusterSize;
  const nl2e = roundUp(aligned / clusterSize, clusterSize / l2eBytes);
  meta += nl2e * l2eBytes;
  const nl1e = roundUp((nl2e * l2eBytes) / clusterSize, clusterSize / 8);
  meta += nl1e * 8;
  meta += qcow2RefcountMetadataBytes((meta + aligned) / clusterSize, clusterSize, refcountOrder);
  return meta + aligned;
}

/** Bytes of the source's clusters holding data, counted as qcow2_measure does. */
async function requiredDataBytes(src: BlockDevice, clusterSize: number): Promise<number> {
  let required = 0;
  let offset = 0;
  const size = src.sizeBytes;
  for await (const e of walkExtents(src)) {
    const end = e.offset + e.length;
    if (end <= offset) continue;
    if ((e.flags & EXTENT_ZERO) !== 0) {
      offset = end;
      continue;
    }
    const pnum = Math.min(size, roundUp(end, clusterSize)) - offset;
    // QEMU extends pnum to the cluster end without clipping at the image end.
    required += (offset % clusterSize) + roundUp(end, clusterSize) - offset;
    offset += pnum;
  }
  return required;
}

export async function measureImage(m: MeasureInput): Promise<MeasureResult> {
  if ((m.source === undefined) === (m.sizeBytes === undefined)) throw new UsageError('measure either a source image or --size, not both');
  if (m.format === 'raw') {
    if (m.source) return { required: m.source.sizeBytes, 'fully-allocated': m.source.sizeBytes };
    const s = roundUp(m.sizeBytes!, 512);
    return { required: s, 'fully-allocated': s };
  }
  if (m.format !== 'qcow2') throw new UnsupportedImageError(`Format driver '${m.format}' does not support measure (raw and qcow2 do)`);
  const q = m.qcow2 ?? {};
  const clusterSize = q.clusterSize ?? 65536;
  const refcountBits = q.refcountBits ?? 16;
  const extendedL2 = q.extendedL2 ?? false;
  const version3 = (q.compat ?? '1.1') === '1.1';
  const virtual = roundUp(m.source ? m.source.sizeBytes : m.sizeBytes!, clusterSize);
  const l2Tables = divRoundUp(virtual / clusterSize, clusterSize / (extendedL2 ? 16 : 8));
  if (l2Tables * (extendedL2 ? 16 : 8) > 32 * 1024 * 1024) throw new UsageError('The image size is too large (try using a larger cluster size)');
  let required = 0;
  if (m.source) required = q.backingFile !== undefined ? virtual : await requiredDataBytes(m.source, clusterSize);
  const pre = q.preallocation ?? 'off';
  if (pre === 'full' || pre === 'falloc') required = virtual;
  const full = qcow2FullSize(virtual, clusterSize, Math.log2(refcountBits), extendedL2);
  const out: MeasureResult = { required: full - virtual + required, 'fully-allocated': full };
  return version3 && m.sourceFormat === 'qcow2' ? { bitmaps: 0, ...out } : out;
}
