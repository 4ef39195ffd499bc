// Opening what a command names: a local image (any registered format) or an NBD URI, as a
// BlockDevice the command can read the same way in both cases.

import type { BlockDevice } from '../../block/device.js';
import { openImageWithFormat } from '../../formats/open.js';
import { UsageError } from '../../errors.js';
import { isNbdUri } from '../parse.js';

export interface OpenedSource {
  readonly device: BlockDevice;
  readonly format: string;
  readonly kind: 'file' | 'nbd';
}

export async function openSource(target: string, opts: { format?: string; readOnly: boolean }): Promise<OpenedSource> {
  if (isNbdUri(target)) {
    if (opts.format !== undefined && opts.format !== 'raw') {
      throw new UsageError(`-f ${opts.format} does not apply to an NBD URI: the export is already a block device`);
    }
    // The NBD client (and TLS with it) loads only for a URI: commands on files start sooner.
    const { openNbdDevice } = await import('../../client/index.js');
    const device = await openNbdDevice(target, { metaContexts: ['base:allocation', 'qemu:allocation-depth'] });
    return { device, format: 'nbd', kind: 'nbd' };
  }
  const opened = await openImageWithFormat(target, { format: opts.format, readOnly: opts.readOnly });
  return { device: opened.device, format: opened.format, kind: 'file' };
}
