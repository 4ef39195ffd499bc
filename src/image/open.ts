// Opening what a toolbox operation names: a local image of any registered format, or an NBD
// URI (the export is then the device, its format is the server's business).

import type { BlockDevice } from '../block/device.js';
import { UsageError } from '../errors.js';
import { openImageWithFormat } from '../formats/open.js';

export interface OpenedTarget {
  readonly device: BlockDevice;
  /** The image format, or 'nbd' for a URI. */
  readonly format: string;
  readonly kind: 'file' | 'nbd';
}

export interface OpenTargetOptions {
  readonly format?: string;
  readonly readOnly: boolean;
  /** Passed to the format driver: where backing files may live. */
  readonly allowBacking?: readonly string[] | boolean;
  /** Cache mode "unsafe" for a file: its flushes return at once. */
  readonly cacheUnsafe?: boolean;
}

export function isNbdUri(text: string): boolean {
  return /^nbds?(\+(unix|vsock))?:\/\//.test(text);
}

export async function openTarget(name: string, o: OpenTargetOptions): Promise<OpenedTarget> {
  if (isNbdUri(name)) {
    if (o.format !== undefined && o.format !== 'raw') throw new UsageError(`format ${o.format} does not apply to an NBD URI: the export is already a block device`);
    // The NBD client (and TLS with it) loads only for a URI: local conversions start sooner.
    const { openNbdDevice } = await import('../client/index.js');
    const device = await openNbdDevice(name, { metaContexts: ['base:allocation', 'qemu:allocation-depth'] });
    return { device, format: 'nbd', kind: 'nbd' };
  }
  const opened = await openImageWithFormat(name, {
    format: o.format,
    readOnly: o.readOnly,
    ...(o.allowBacking !== undefined ? { allowBacking: o.allowBacking } : {}),
    ...(o.cacheUnsafe === true ? { cacheUnsafe: true } : {}),
  });
  return { device: opened.device, format: opened.format, kind: 'file' };
}
