// Format probing by magic only (never by file name or heuristics), in the spirit of
// qemu-img's probe: a registered driver's probe wins; a known magic without a driver is an
// error rather than a silent fallback to raw; anything else is raw.

import { UnsupportedImageError } from '../errors.js';
import { HostFile } from '../io/host-file.js';
import { matchKnownMagic, PROBE_HEAD_BYTES } from './magic.js';
import { defaultRegistry, type FormatRegistry } from './registry.js';

export { KNOWN_MAGICS, matchKnownMagic, PROBE_HEAD_BYTES } from './magic.js';

/**
 * The format of an image whose first bytes are `head` (PROBE_HEAD_BYTES, zero-filled past EOF).
 * Throws UnsupportedImageError when the magic names a format with no registered driver.
 */
export function probeFormat(head: Buffer, registry: FormatRegistry = defaultRegistry): string {
  for (const d of registry.structured()) {
    if (d.probe(head)) return d.name;
  }
  const known = matchKnownMagic(head);
  if (known !== null) {
    throw new UnsupportedImageError(
      `image has the ${known} signature but this build has no ${known} driver; refusing to treat it as raw`,
    );
  }
  return 'raw';
}

/** Read the probe head of `path` (a file or block device). */
export async function readProbeHead(path: string): Promise<Buffer> {
  const f = await HostFile.open(path, { readOnly: true });
  try {
    const head = Buffer.alloc(PROBE_HEAD_BYTES);
    await f.pread(head, 0);
    return head;
  } finally {
    await f.close();
  }
}
