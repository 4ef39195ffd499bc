// Opening an image by path: with an explicit format, no probing at all (the safe mode for
// untrusted images); without one, probe the first 512 bytes by magic.

import type { BlockDevice } from '../block/device.js';
import { probeFormat, readProbeHead } from './probe.js';
import { defaultRegistry, type FormatRegistry, type OpenImageOptions } from './registry.js';

export type { OpenImageOptions } from './registry.js';

export interface OpenImageRequest extends OpenImageOptions {
  /** 'raw', 'qcow2', ...; omitted means probe. */
  readonly format?: string;
  readonly registry?: FormatRegistry;
}

export interface OpenedImage {
  readonly format: string;
  readonly probed: boolean;
  readonly device: BlockDevice;
}

/** Open `path` as a block device and say which format was used and whether it was probed. */
export async function openImageWithFormat(path: string, opts: OpenImageRequest = {}): Promise<OpenedImage> {
  const { format, registry = defaultRegistry, ...rest } = opts;
  if (format !== undefined) {
    const driver = registry.require(format);
    return { format, probed: false, device: await driver.open(path, { ...rest, probed: false }) };
  }
  const name = probeFormat(await readProbeHead(path), registry);
  const driver = registry.require(name);
  return { format: name, probed: true, device: await driver.open(path, { ...rest, probed: true }) };
}

export async function openImage(path: string, opts: OpenImageRequest = {}): Promise<BlockDevice> {
  return (await openImageWithFormat(path, opts)).device;
}
