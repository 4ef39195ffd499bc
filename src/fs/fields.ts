// Label and UUID fields as blkid prints them: UUIDs byte by byte in 8-4-4-4-12 groups (not the
// mixed-endian GPT form), labels up to the first NUL, UTF-8 where the filesystem says so.

export function formatUuid(buf: Buffer, pos: number): string {
  const h = buf.subarray(pos, pos + 16).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function isZero(buf: Buffer, pos: number, length: number): boolean {
  for (let i = 0; i < length; i++) if (buf[pos + i] !== 0) return false;
  return true;
}

/** A NUL-terminated (or NUL-padded) string field; undefined when empty. */
export function cString(buf: Buffer, pos: number, length: number, encoding: BufferEncoding = 'utf8'): string | undefined {
  const field = buf.subarray(pos, pos + length);
  const nul = field.indexOf(0);
  const s = field.subarray(0, nul < 0 ? field.length : nul).toString(encoding);
  return s === '' ? undefined : s;
}

/** Spread helper: `{ ...optional('label', x) }` adds the key only when x is defined. */
export function optional<K extends string>(key: K, value: string | undefined): { [P in K]?: string } {
  return (value === undefined ? {} : { [key]: value }) as { [P in K]?: string };
}
