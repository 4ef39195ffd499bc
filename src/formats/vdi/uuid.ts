// VDI UUIDs on disk (vdi-notes.md, section 2): the first three RFC 4122 fields — time_low
// (4 bytes), time_mid (2), time_hi_and_version (2) — are stored little-endian, the last 8 bytes
// as they are (the mixed-endian "GUID" layout QEMU converts with qemu_uuid_bswap).

import { UsageError } from '../../errors.js';

function swapFields(src: Buffer): Buffer {
  const out = Buffer.from(src);
  out.writeUInt32BE(src.readUInt32LE(0), 0);
  out.writeUInt16BE(src.readUInt16LE(4), 4);
  out.writeUInt16BE(src.readUInt16LE(6), 6);
  return out;
}

/** The canonical text form of 16 on-disk bytes. */
export function formatVdiUuid(disk: Buffer): string {
  const h = swapFields(disk.subarray(0, 16)).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The 16 on-disk bytes for a canonical text UUID. */
export function encodeVdiUuid(text: string): Buffer {
  if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(text)) throw new UsageError(`vdi: ${JSON.stringify(text)} is not a UUID`);
  // The swap is its own inverse.
  return swapFields(Buffer.from(text.replace(/-/g, ''), 'hex'));
}

/** A fresh random (version 4) UUID in on-disk form. */
export function randomVdiUuid(): Buffer {
  // Web Crypto's global loads the crypto module on first use, not with every driver.
  return encodeVdiUuid(globalThis.crypto.randomUUID());
}
