// The qcow2 entry in the format registry: probe by magic, open by path with the backing chain
// opened through the registry (any registered format, read-only, depth-bounded).

import type { BlockDevice } from '../../block/device.js';
import { UnsupportedImageError } from '../../errors.js';
import { HostFile } from '../../io/host-file.js';
import { openImageWithFormat } from '../open.js';
import type { FormatDriver, FormatRegistry, OpenImageOptions } from '../registry.js';
import { QCOW2_MAGIC } from './header.js';
import { Qcow2Device } from './driver.js';

/** Backing chains deeper than this are refused (QEMU has no fixed limit; loops must end). */
export const QCOW2_MAX_BACKING_DEPTH = 64;

export interface Qcow2PathOptions extends OpenImageOptions {
  /** false: refuse images that have a backing file. */
  readonly allowBacking?: boolean;
  readonly l2CacheBytes?: number;
  readonly registry?: FormatRegistry;
  /** Internal: how deep in a backing chain this image is. */
  readonly backingDepth?: number;
}

export async function openQcow2Path(path: string, opts: Qcow2PathOptions = {}): Promise<Qcow2Device> {
  const depth = opts.backingDepth ?? 0;
  if (depth > QCOW2_MAX_BACKING_DEPTH) throw new UnsupportedImageError(`qcow2: backing chain deeper than ${QCOW2_MAX_BACKING_DEPTH} at ${path}`);
  const readOnly = opts.readOnly ?? false;
  const file = await HostFile.open(path, { readOnly });
  try {
    return await Qcow2Device.open(file, {
      readOnly,
      l2CacheBytes: typeof opts.l2CacheBytes === 'number' ? opts.l2CacheBytes : undefined,
      openBacking: async (ref): Promise<BlockDevice> => {
        if (opts.allowBacking === false) throw new UnsupportedImageError(`qcow2: ${path} has backing file ${JSON.stringify(ref.fileName)} and backing files are not allowed here`);
        const nested: Qcow2PathOptions = { readOnly: true, backingDepth: depth + 1, allowBacking: opts.allowBacking, registry: opts.registry };
        const r = await openImageWithFormat(ref.path, { ...nested, format: ref.format ?? undefined });
        return r.device;
      },
    });
  } catch (err) {
    await file.close();
    throw err;
  }
}

export const qcow2Format: FormatDriver = {
  name: 'qcow2',
  probe: (head) => head.length >= 8 && head.readUInt32BE(0) === QCOW2_MAGIC && [2, 3].includes(head.readUInt32BE(4)),
  open: (path, opts) => openQcow2Path(path, opts as Qcow2PathOptions),
};
