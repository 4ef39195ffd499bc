// The format registry: each image format (raw, qcow2, qed, vdi) registers a driver with a
// magic-based probe and an opener; probe.ts and open.ts consult it. Raw is always present.

import type { BlockDevice } from '../block/device.js';
import { UnsupportedImageError } from '../errors.js';
import { qcow2Format } from './qcow2/format.js';
import { qedFormat } from './qed/format.js';
import { vdiFormat } from './vdi/format.js';
import { rawFormat } from './raw/driver.js';

/**
 * Options every opener accepts. Open-ended on purpose: a driver reads the keys it knows
 * (e.g. `allowBacking` for qcow2) and ignores the rest, so callers pass one object down.
 */
export interface OpenImageOptions {
  readonly readOnly?: boolean;
  /**
   * The format came from probing, not from the user. Raw then refuses writes that would make
   * the image probe as another format (QEMU's "probed raw" rule).
   */
  readonly probed?: boolean;
  /** Cache mode "unsafe": the image's flushes return at once (convert -t unsafe). */
  readonly cacheUnsafe?: boolean;
  readonly [key: string]: unknown;
}

export interface FormatDriver {
  /** Lower-case format name as qemu-img spells it: 'raw', 'qcow2', 'qed', 'vdi'. */
  readonly name: string;
  /** True when the first PROBE_HEAD_BYTES bytes (zero-filled past EOF) carry this format's magic. */
  probe(head: Buffer): boolean;
  open(path: string, opts: OpenImageOptions): Promise<BlockDevice>;
}

export class FormatRegistry {
  private readonly drivers = new Map<string, FormatDriver>();

  /** Register (or replace) the driver for `driver.name`. */
  register(driver: FormatDriver): void {
    this.drivers.set(driver.name, driver);
  }

  get(name: string): FormatDriver | undefined {
    return this.drivers.get(name);
  }

  /** Like get(), but throws UnsupportedImageError naming the format when no driver is registered. */
  require(name: string): FormatDriver {
    const d = this.drivers.get(name);
    if (!d) throw new UnsupportedImageError(`image format '${name}' is not supported by this build (known: ${this.names().join(', ')})`);
    return d;
  }

  names(): string[] {
    return [...this.drivers.keys()];
  }

  /** Drivers other than raw, in registration order (raw matches anything, so it is the fallback). */
  structured(): FormatDriver[] {
    return [...this.drivers.values()].filter((d) => d.name !== 'raw');
  }
}

export function createFormatRegistry(): FormatRegistry {
  const r = new FormatRegistry();
  r.register(rawFormat);
  return r;
}

/** The process-wide registry that format modules register into. */
export const defaultRegistry: FormatRegistry = createFormatRegistry();
defaultRegistry.register(qcow2Format);
defaultRegistry.register(qedFormat);
defaultRegistry.register(vdiFormat);

export function registerFormat(driver: FormatDriver, registry: FormatRegistry = defaultRegistry): void {
  registry.register(driver);
}
