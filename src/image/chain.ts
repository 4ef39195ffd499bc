// The backing chain of an image, read from the headers alone (no image is opened as a device):
// top first, each entry with its resolved path and format. Names resolve against the directory
// of the image that records them; a chain that loops or grows past BACKING_MAX_DEPTH is refused.

import { dirname, isAbsolute, resolve } from 'node:path';
import { realpath } from 'node:fs/promises';
import '../formats/registry.js';
import { UnsupportedImageError } from '../errors.js';
import { BACKING_MAX_DEPTH } from '../formats/backing-policy.js';
import { probeFormat, readProbeHead } from '../formats/probe.js';
import { readBackingReference } from './backing-header.js';

export interface ChainEntry {
  readonly path: string;
  readonly format: string;
  /** The backing file name as this image records it (null: end of the chain). */
  readonly backingFile: string | null;
  readonly backingFormat: string | null;
}

export function resolveBackingName(imagePath: string, name: string): string {
  return isAbsolute(name) ? name : resolve(dirname(resolve(imagePath)), name);
}

export async function detectFormat(path: string): Promise<string> {
  return probeFormat(await readProbeHead(path));
}

export async function readChain(path: string, format?: string): Promise<ChainEntry[]> {
  const chain: ChainEntry[] = [];
  const seen = new Set<string>();
  let cur: { path: string; format: string } | null = { path: resolve(path), format: format ?? (await detectFormat(path)) };
  while (cur) {
    const real = await realpath(cur.path);
    if (seen.has(real)) throw new UnsupportedImageError(`backing chain of ${path} loops at ${cur.path}`);
    if (chain.length > BACKING_MAX_DEPTH) throw new UnsupportedImageError(`backing chain of ${path} is deeper than ${BACKING_MAX_DEPTH}`);
    seen.add(real);
    const ref = await readBackingReference(cur.path, cur.format);
    chain.push({ path: cur.path, format: cur.format, ...ref });
    if (ref.backingFile === null) break;
    const next = resolveBackingName(cur.path, ref.backingFile);
    cur = { path: next, format: ref.backingFormat ?? (await detectFormat(next)) };
  }
  return chain;
}
