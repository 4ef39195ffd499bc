// An NBD export described with nbdinfo --json's field names, so scripts written for nbdinfo
// read imgbd's output unchanged.

import type { ExportInfo } from '../../client/index.js';
import * as C from '../../protocol/constants.js';

export function exportJson(info: ExportInfo, contexts: readonly string[]): Record<string, unknown> {
  const f = info.transmissionFlags;
  const has = (bit: number): boolean => (f & bit) !== 0;
  return {
    'export-name': info.name,
    ...(info.description !== undefined ? { description: info.description } : {}),
    'export-size': info.sizeBytes,
    is_rotational: has(C.NBD_FLAG_ROTATIONAL),
    is_read_only: has(C.NBD_FLAG_READ_ONLY),
    can_cache: has(C.NBD_FLAG_SEND_CACHE),
    can_df: has(C.NBD_FLAG_SEND_DF),
    can_fast_zero: has(C.NBD_FLAG_SEND_FAST_ZERO),
    can_flush: has(C.NBD_FLAG_SEND_FLUSH),
    can_fua: has(C.NBD_FLAG_SEND_FUA),
    can_multi_conn: has(C.NBD_FLAG_CAN_MULTI_CONN),
    can_trim: has(C.NBD_FLAG_SEND_TRIM),
    can_zero: has(C.NBD_FLAG_SEND_WRITE_ZEROES),
    ...(info.blockSizes
      ? {
          block_size_minimum: info.blockSizes.minimum,
          block_size_preferred: info.blockSizes.preferred,
          block_size_maximum: info.blockSizes.maximum,
        }
      : {}),
    contexts,
  };
}

export function exportText(info: ExportInfo, contexts: readonly string[]): string {
  const j = exportJson(info, contexts);
  const lines = [`export: ${JSON.stringify(info.name)}`];
  for (const [k, v] of Object.entries(j)) {
    if (k === 'export-name') continue;
    lines.push(`\t${k}: ${Array.isArray(v) ? v.join(' ') : String(v)}`);
  }
  return `${lines.join('\n')}\n`;
}
