// Creating an empty image of any writable format for convert, rootfs and commit's emptying:
// one entry point over the format drivers' creators.

// The registry first: the format modules import it back, and it must see them initialised.
import '../formats/registry.js';
import { UsageError } from '../errors.js';
import { HostFile } from '../io/host-file.js';
import { createQcow2, type Qcow2CreateOptions } from '../formats/qcow2/index.js';
import { createQed, type QedCreateOptions } from '../formats/qed/create.js';
import { createVdi, type VdiCreateOptions } from '../formats/vdi/create.js';

export const CREATABLE_FORMATS = ['raw', 'qcow2', 'qed', 'vdi'] as const;
export type CreatableFormat = (typeof CREATABLE_FORMATS)[number];

export interface ImageCreateOptions {
  readonly qcow2?: Omit<Qcow2CreateOptions, 'sizeBytes' | 'backingFile' | 'backingFormat' | 'cacheUnsafe'>;
  readonly qed?: Omit<QedCreateOptions, 'sizeBytes' | 'backingFile' | 'backingFormat' | 'cacheUnsafe'>;
  readonly vdi?: Omit<VdiCreateOptions, 'sizeBytes' | 'cacheUnsafe'>;
  /** Stored as given (relative names are relative to the new image's directory). */
  readonly backingFile?: string;
  readonly backingFormat?: string;
  /** Cache mode "unsafe": the new image is not flushed (convert's default, as qemu-img's). */
  readonly cacheUnsafe?: boolean;
}

export function isCreatableFormat(f: string): f is CreatableFormat {
  return (CREATABLE_FORMATS as readonly string[]).includes(f);
}

/** Create (or overwrite) `path` as an empty image: reads as zeros, or as its backing file. */
export async function createImage(path: string, format: string, sizeBytes: number, o: ImageCreateOptions = {}): Promise<void> {
  if (!isCreatableFormat(format)) throw new UsageError(`cannot create '${format}' images (known: ${CREATABLE_FORMATS.join(', ')})`);
  const backing = o.backingFile !== undefined ? { backingFile: o.backingFile, backingFormat: o.backingFormat } : {};
  const cacheUnsafe = o.cacheUnsafe === true;
  switch (format) {
    case 'qcow2':
      return createQcow2(path, { ...o.qcow2, sizeBytes, cacheUnsafe, ...backing });
    case 'qed':
      return createQed(path, { ...o.qed, sizeBytes, cacheUnsafe, ...backing });
    case 'vdi':
      if (o.backingFile !== undefined) throw new UsageError('vdi images have no backing file');
      return createVdi(path, { ...o.vdi, sizeBytes, cacheUnsafe });
    case 'raw': {
      if (o.backingFile !== undefined) throw new UsageError('raw images have no backing file');
      const f = await HostFile.open(path, { create: true, ignoreFlush: cacheUnsafe });
      try {
        await f.truncate(0);
        await f.truncate(sizeBytes);
        await f.datasync();
      } finally {
        await f.close();
      }
    }
  }
}
