// GUIDs as UEFI stores them (UEFI 2.10 Appendix A): the first three fields little-endian,
// the last eight bytes in order; printed lower case like the kernel and blkid print them.

export function formatGuid(buf: Buffer, pos: number): string {
  const h = (from: number, to: number): string => buf.subarray(pos + from, pos + to).toString('hex');
  const le = (from: number, to: number): string => Buffer.from(buf.subarray(pos + from, pos + to)).reverse().toString('hex');
  return `${le(0, 4)}-${le(4, 6)}-${le(6, 8)}-${h(8, 10)}-${h(10, 16)}`;
}

/** Encode a GUID string into its 16 on-disk bytes (for tests and table writers). */
export function encodeGuid(guid: string): Buffer {
  const m = /^([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})$/i.exec(guid);
  if (!m) throw new TypeError(`not a GUID: ${guid}`);
  const rev = (s: string): Buffer => Buffer.from(s, 'hex').reverse();
  return Buffer.concat([rev(m[1]), rev(m[2]), rev(m[3]), Buffer.from(m[4] + m[5], 'hex')]);
}

export function isZeroGuid(buf: Buffer, pos: number): boolean {
  for (let i = 0; i < 16; i++) if (buf[pos + i] !== 0) return false;
  return true;
}
