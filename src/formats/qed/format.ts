// The qed entry in the format registry: probe by magic, open by path with the backing file opened
// through the registry (any registered format, read-only) under the backing policy shared with
// the other formats (confined to the allowed roots, loops and over-deep chains refused).

import { HostFile } from '../../io/host-file.js';
import { BackingPolicyError, backingFormatFor, resolveBacking, topBackingPolicy, type BackingPolicy } from '../backing-policy.js';
import type { FormatDriver, FormatRegistry, OpenImageOptions } from '../registry.js';
import { QedDevice } from './driver.js';
import { QED_MAGIC } from './header.js';

export interface QedPathOptions extends OpenImageOptions {
  /**
   * Where backing files may live: false refuses images that have one, an array adds allowed
   * roots to the image's own directory tree (the default), true allows any.
   */
  readonly allowBacking?: readonly string[] | boolean;
  readonly tableCacheBytes?: number;
  readonly registry?: FormatRegistry;
  /** Open without the backing file (see QedOpenOptions.ignoreBacking). */
  readonly ignoreBacking?: boolean;
  /** Internal: the policy inherited from the image above in a backing chain. */
  readonly backingPolicy?: BackingPolicy;
}

function isPolicy(x: unknown): x is BackingPolicy {
  return typeof x === 'object' && x !== null && Array.isArray((x as BackingPolicy).chain);
}

export async function openQedPath(path: string, opts: QedPathOptions = {}): Promise<QedDevice> {
  const readOnly = opts.readOnly ?? false;
  const policy = isPolicy(opts.backingPolicy) ? opts.backingPolicy : await topBackingPolicy(path, opts.allowBacking);
  const file = await HostFile.open(path, { readOnly, ignoreFlush: opts.cacheUnsafe === true });
  try {
    return await QedDevice.open(file, {
      readOnly,
      tableCacheBytes: typeof opts.tableCacheBytes === 'number' ? opts.tableCacheBytes : undefined,
      ignoreBacking: opts.ignoreBacking === true,
      openBacking: async (ref) => {
        if (policy === false) throw new BackingPolicyError(`qed: ${path} has backing file ${JSON.stringify(ref.fileName)} and backing files are not allowed here`);
        const r = await resolveBacking(path, ref.fileName, policy);
        // Imported when needed: open.js imports the registry, which imports this module.
        const { openImageWithFormat } = await import('../open.js');
        // Never writable; QED records only "raw, do not probe", anything else is probed by magic.
        const opened = await openImageWithFormat(r.path, {
          readOnly: true,
          backingPolicy: r.next,
          allowBacking: opts.allowBacking,
          registry: opts.registry,
          format: backingFormatFor(ref.format),
        });
        return opened.device;
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
