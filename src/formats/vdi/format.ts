// The vdi entry in the format registry: probe by the signature at 0x40, open by path.

import { HostFile } from '../../io/host-file.js';
import type { FormatDriver, OpenImageOptions } from '../registry.js';
import { VdiDevice } from './driver.js';
import { VDI_SIGNATURE } from './header.js';

export async function openVdiPath(path: string, opts: OpenImageOptions = {}): Promise<VdiDevice> {
  const readOnly = opts.readOnly ?? false;
  const file = await HostFile.open(path, { readOnly, ignoreFlush: opts.cacheUnsafe === true });
  try {
    return await VdiDevice.open(file, { readOnly });
  } catch (err) {
    await file.close();
    throw err;
  }
}

export const vdiFormat: FormatDriver = {
  name: 'vdi',
  probe: (head) => head.length >= 0x44 && head.readUInt32LE(0x40) === VDI_SIGNATURE,
  open: (path, opts) => openVdiPath(path, opts),
};
