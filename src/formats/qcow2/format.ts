// The qcow2 entry in the format registry: probe by magic, open by path with the backing chain
// opened through the registry (any registered format, read-only, depth-bounded).

import type { BlockDevice } from '../../block/device.js';
import { BACKING_MAX_DEPTH, BackingPolicyError, backingFormatFor, resolveBacking, topBackingPolicy, type BackingPolicy } from '../backing-policy.js';
import { HostFile } from '../../io/host-file.js';
import type { FormatDriver, FormatRegistry, OpenImageOptions } from '../registry.js';
import { QCOW2_MAGIC } from './header.js';
import { Qcow2Device } from './driver.js';

/** Backing chains deeper than this are refused (QEMU has no fixed limit; loops must end). */
export const QCOW2_MAX_BACKING_DEPTH = BACKING_MAX_DEPTH;

export interface Qcow2PathOptions extends OpenImageOptions {
  /**
   * Where backing (and external data) files may live: false refuses images that have one, an
   * array adds allowed roots to the image's own directory tree (the default), true allows any.
   */
  readonly allowBacking?: readonly string[] | boolean;
  readonly l2CacheBytes?: number;
  readonly registry?: FormatRegistry;
  /** Serve this internal snapshot (id, else name) read-only. */
  readonly snapshot?: string;
  /** Open without the backing file (check, snapshot, resize never read guest data through it). */
  readonly ignoreBacking?: boolean;
  /** Internal: the policy inherited from the image above in a backing chain. */
  readonly backingPolicy?: BackingPolicy;
}

export async function openQcow2Path(path: string, opts: Qcow2PathOptions = {}): Promise<Qcow2Device> {
  const readOnly = opts.readOnly ?? false;
  const policy = isPolicy(opts.backingPolicy) ? opts.backingPolicy : await topBackingPolicy(path, opts.allowBacking);
  const refuse = (what: string, name: string): never => {
    throw new BackingPolicyError(`qcow2: ${path} has ${what} ${JSON.stringify(name)} and ${what}s are not allowed here`);
  };
  const ignoreFlush = opts.cacheUnsafe === true;
  const file = await HostFile.open(path, { readOnly, ignoreFlush });
  try {
    return await Qcow2Device.open(file, {
      readOnly,
      ...(opts.ignoreBacking === true ? { backing: null } : {}),
      snapshot: typeof opts.snapshot === 'string' ? opts.snapshot : undefined,
      l2CacheBytes: typeof opts.l2CacheBytes === 'number' ? opts.l2CacheBytes : undefined,
      openBacking: async (ref): Promise<BlockDevice> => {
        if (policy === false) return refuse('backing file', ref.fileName);
        const r = await resolveBacking(path, ref.fileName, policy);
        // Never writable, whatever the caller asked for the top image; the recorded format wins
        // and a missing one is probed by magic (a recorded 'raw' is never probed).
        const nested: Qcow2PathOptions = { readOnly: true, backingPolicy: r.next, allowBacking: opts.allowBacking, registry: opts.registry };
        // Imported when needed: open.js imports the registry, which imports this module.
        const { openImageWithFormat } = await import('../open.js');
        const opened = await openImageWithFormat(r.path, { ...nested, format: backingFormatFor(ref.format) });
        return opened.device;
      },
      openDataFile: async (ref, ro): Promise<HostFile> => {
        if (policy === false) return refuse('data file', ref.fileName);
        const r = await resolveBacking(path, ref.fileName, policy, 'data file');
        return HostFile.open(r.path, { readOnly: ro, ignoreFlush });
      },
    });
  } catch (err) {
    await file.close();
    throw err;
  }
}

function isPolicy(x: unknown): x is BackingPolicy {
  return typeof x === 'object' && x !== null && Array.isArray((x as BackingPolicy).chain);
}

export const qcow2Format: FormatDriver = {
  name: 'qcow2',
  probe: (head) => head.length >= 8 && head.readUInt32BE(0) === QCOW2_MAGIC && [2, 3].includes(head.readUInt32BE(4)),
  open: (path, opts) => openQcow2Path(path, opts as Qcow2PathOptions),
};
