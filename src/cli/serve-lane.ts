// The script of `imgbd serve`'s connection threads (server/lanes.ts). The main thread offers
// them the raw exports with no overlay: such an image keeps no state but the file, so the
// thread reopens it through the main thread's descriptor (the same file, even if its path has
// since been replaced) and puts the same window over it.

import type { BlockDevice } from '../block/device.js';
import { offsetFilter } from '../block/filters/offset.js';
import { openRaw } from '../formats/raw/driver.js';
import { runLane } from '../server/lane-host.js';

/** ExportConfig.reopen for `imgbd serve`. */
export interface RawReopen {
  readonly fd: number;
  readonly readOnly: boolean;
  readonly probedRaw: boolean;
  readonly window?: { readonly offsetBytes: number; readonly sizeBytes?: number };
}

async function open(reopen: unknown): Promise<BlockDevice> {
  const r = reopen as RawReopen;
  const raw = await openRaw(`/proc/self/fd/${r.fd}`, { readOnly: r.readOnly, probedRaw: r.probedRaw });
  try {
    return r.window === undefined ? raw : offsetFilter(raw, r.window);
  } catch (e) {
    await raw.close();
    throw e;
  }
}

void runLane(open);
