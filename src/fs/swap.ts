// Linux swap areas (include/linux/swap.h union swap_header), recognised so that a swap
// partition is refused rather than mounted. The signature sits in the last 10 bytes of the
// first page, and the page size is the writer's, so every size Linux supports is checked.
//
//   pagesize-10  10  "SWAPSPACE2" (v1), "SWAP-SPACE" (v0), or a hibernation image signature
//   v1 header at byte 1024 (little-endian): 0x00 u32 version (1), 0x0C 16 uuid, 0x1C 16 volume label

import { cString, formatUuid, isZero, optional } from './fields.js';
import type { ProbeResult } from './types.js';

export const SWAP_PAGE_SIZES = [4096, 8192, 16384, 32768, 65536] as const;
const SUSPEND_SIGNATURES = ['S1SUSPEND', 'S2SUSPEND', 'ULSUSPEND', 'LINHIB0001'];

/**
 * `tail` is the 10 bytes at pagesize-10; `head` the first 4096 bytes of the volume (for the
 * v1 header at 1024).
 */
export function probeSwap(tail: Buffer, head: Buffer): ProbeResult | null {
  const sig = tail.toString('latin1', 0, 10);
  if (sig === 'SWAP-SPACE') return { type: 'swap', version: '0' };
  if (SUSPEND_SIGNATURES.some((s) => sig.startsWith(s))) return { type: 'swsuspend' };
  if (sig !== 'SWAPSPACE2' || head.length < 1024 + 0x2c) return null;
  const version = head.readUInt32LE(1024);
  if (version !== 1 && head.readUInt32BE(1024) !== 1) return null;
  return {
    type: 'swap',
    version: '1',
    ...(isZero(head, 1024 + 0x0c, 16) ? {} : { uuid: formatUuid(head, 1024 + 0x0c) }),
    ...optional('label', cString(head, 1024 + 0x1c, 16)),
  };
}
