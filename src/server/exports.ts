// The exports a server offers: configuration, lookup by name (the empty name is the default
// export), and the transmission flags each one advertises (nbd-proto.md "Transmission
// flags"), computed from the effective capabilities of its Backend.

import { Backend } from '../block/backend.js';
import type { BlockDevice, BlockSizes } from '../block/device.js';
import { UsageError } from '../errors.js';
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_ROTATIONAL,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_MAX_STRING,
} from '../protocol/constants.js';

export interface ExportConfig {
  readonly name: string;
  readonly description?: string;
  readonly device: BlockDevice;
  readonly readOnly: boolean;
  /**
   * Set false to withhold NBD_FLAG_CAN_MULTI_CONN even where it is safe: when the server
   * takes a single client (qemu-nbd's default --shared=1), a client that believed it could
   * open more connections would be refused.
   */
  readonly multiConn?: boolean;
  /**
   * How another thread opens this image for itself, for the server's lanes (lanes.ts): given
   * only where every layer keeps no state of its own, so that writes through either open are
   * seen at once through the other. Structured-cloned; the lanes' entry script reads it.
   */
  readonly reopen?: unknown;
}

export interface ServedExport {
  readonly name: string;
  readonly description: string;
  /** Validates and emulates; every request goes through it. */
  readonly backend: Backend;
  /** The layer's own allocation-depth support: qemu:allocation-depth is offered only then. */
  readonly allocationDepth: boolean;
  readonly sizes: BlockSizes;
  /** Transmission flags without NBD_FLAG_SEND_DF (which depends on the connection). */
  readonly baseFlags: number;
}

export function serveExport(cfg: ExportConfig, maxPayloadBytes: number): ServedExport {
  if (Buffer.byteLength(cfg.name) > NBD_MAX_STRING) throw new UsageError(`export name is longer than ${NBD_MAX_STRING} bytes`);
  if (cfg.description !== undefined && Buffer.byteLength(cfg.description) > NBD_MAX_STRING) {
    throw new UsageError(`export description is longer than ${NBD_MAX_STRING} bytes`);
  }
  const backend = cfg.device instanceof Backend && !cfg.readOnly ? cfg.device : new Backend(cfg.device, { readOnly: cfg.readOnly });
  const base = backend.blockSizes();
  // "preferred ... MUST be a power of 2 at least as large as the maximum of the minimum block
  // size and 2^9"; "maximum ... MUST be at least as large as the preferred block size".
  const preferred = Math.max(base.preferred, 512);
  const cap = Math.min(base.maximum, maxPayloadBytes);
  const sizes: BlockSizes = { minimum: base.minimum, preferred, maximum: Math.max(cap - (cap % base.minimum), preferred) };
  const inner = backend.next.capabilities();
  return {
    name: cfg.name,
    description: cfg.description ?? '',
    backend,
    allocationDepth: inner.allocationDepth && typeof backend.next.allocationDepth === 'function',
    sizes,
    baseFlags: transmissionFlags(backend, cfg.multiConn ?? true),
  };
}

function transmissionFlags(backend: Backend, allowMultiConn: boolean): number {
  const c = backend.capabilities();
  let f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_CACHE;
  if (!c.writable) f |= NBD_FLAG_READ_ONLY;
  if (c.flush) f |= NBD_FLAG_SEND_FLUSH;
  if (c.writable && c.fua) f |= NBD_FLAG_SEND_FUA;
  if (c.writable && c.trim) f |= NBD_FLAG_SEND_TRIM;
  if (c.writable && c.zero) {
    f |= NBD_FLAG_SEND_WRITE_ZEROES;
    // "MUST set this transmission flag to 0 if NBD_FLAG_SEND_WRITE_ZEROES is not set"
    if (c.fastZero) f |= NBD_FLAG_SEND_FAST_ZERO;
  }
  if (c.multiConn && allowMultiConn) f |= NBD_FLAG_CAN_MULTI_CONN;
  if (c.rotational) f |= NBD_FLAG_ROTATIONAL;
  return f;
}

/** Flags for a connection: NBD_FLAG_SEND_DF only when structured replies were negotiated. */
export function connectionFlags(exp: ServedExport, structured: boolean): number {
  return structured ? exp.baseFlags | NBD_FLAG_SEND_DF : exp.baseFlags;
}

export class ExportTable {
  private readonly byName = new Map<string, ServedExport>();
  private readonly defaultName: string | undefined;

  constructor(exports: readonly ExportConfig[], maxPayloadBytes: number, defaultName?: string) {
    for (const cfg of exports) {
      if (this.byName.has(cfg.name)) throw new UsageError(`export ${JSON.stringify(cfg.name)} is defined twice`);
      this.byName.set(cfg.name, serveExport(cfg, maxPayloadBytes));
    }
    if (defaultName !== undefined && !this.byName.has(defaultName)) {
      throw new UsageError(`default export ${JSON.stringify(defaultName)} is not among the exports`);
    }
    this.defaultName = defaultName ?? (this.byName.size === 1 ? [...this.byName.keys()][0] : undefined);
  }

  /** The export a client means by `name`; the empty name is the default export. */
  lookup(name: string): ServedExport | undefined {
    const exact = this.byName.get(name);
    if (exact !== undefined || name !== '' || this.defaultName === undefined) return exact;
    return this.byName.get(this.defaultName);
  }

  all(): ServedExport[] {
    return [...this.byName.values()];
  }
}
