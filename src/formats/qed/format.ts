// The qed entry in the format registry: probe by magic, open by path with the backing file opened
// through the registry (any registered format, read-only, depth-bounded, confined to the allowed
// directories).

import { UnsupportedImageError } from '../../errors.js';
import { HostFile } from '../../io/host-file.js';
import type { FormatDriver, FormatRegistry, OpenImageOptions } from '../registry.js';
import { resolveBackingPath } from './backing-path.js';
import { QedDevice } from './driver.js';
import { QED_MAGIC } from './header.js';

/** Backing chains deeper than this are refused, so a loop of images ends. */
export const QED_MAX_BACKING_DEPTH = 64;

export interface QedPathOptions extends OpenImageOptions {
  /**
   * Directories a backing file may live in (default: the image's own directory tree); false
   * refuses images with a backing file.
   */
  readonly allowBacking?: readonly string[] | boolean;
  readonly tableCacheBytes?: number;
  readonly registry?: FormatRegistry;
  /** Internal: how deep in a backing chain this image is. */
  readonly backingDepth?: number;
}

export async function openQedPath(path: string, opts: QedPathOptions = {}): Promise<QedDevice> {
  const depth = typeof opts.backingDepth === 'number' ? opts.backingDepth : 0;
  if (depth > QED_MAX_BACKING_DEPTH) throw new UnsupportedImageError(`qed: backing chain deeper than ${QED_MAX_BACKING_DEPTH} at ${path}`);
  const readOnly = opts.readOnly ?? false;
  const allow = opts.allowBacking;
  const file = await HostFile.open(path, { readOnly });
  try {
    return await QedDevice.open(file, {
      readOnly,
      tableCacheBytes: typeof opts.tableCacheBytes === 'number' ? opts.tableCacheBytes : undefined,
      openBacking: async (ref) => {
        if (allow === false) throw new UnsupportedImageError(`qed: ${path} has backing file ${JSON.stringify(ref.fileName)} and backing files are not allowed here`);
        const dirs = Array.isArray(allow) ? allow.filter((d): d is string => typeof d === 'string') : undefined;
        const target = await resolveBackingPath('qed', path, ref.fileName, dirs);
        // Imported when needed: open.js imports the registry, which imports this module.
        const { openImageWithFormat } = await import('../open.js');
        const r = await openImageWithFormat(target, {
          readOnly: true,
          backingDepth: depth + 1,
          allowBacking: allow,
          registry: opts.registry,
          format: ref.format ?? undefined,
        });
        return r.device;
      },
    });
  } catch (err) {
    await file.close();
    throw err;
  }
}

export const qedFormat: FormatDriver = {
  name: 'qed',
  probe: (head) => head.length >= 4 && head.readUInt32LE(0) === QED_MAGIC,
  open: (path, opts) => openQedPath(path, opts as QedPathOptions),
};
