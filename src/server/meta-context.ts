// Metadata context negotiation (nbd-proto.md "Metadata querying", NBD_OPT_LIST_META_CONTEXT
// and NBD_OPT_SET_META_CONTEXT): which contexts a query names. Two contexts exist here:
// `base:allocation` on every export and `qemu:allocation-depth` where the device reports
// allocation depth. Queries follow qemu: an empty leaf (`base:`, `qemu:`) is a wildcard when
// listing and selects nothing when setting; unknown namespaces and leaves are ignored ("the
// server MUST ignore query strings belonging to an unknown namespace").

import { BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH } from '../protocol/constants.js';
import type { ServedExport } from './exports.js';

export type MetaContextKind = 'allocation' | 'depth';

export interface MetaContext {
  readonly id: number;
  readonly name: string;
  readonly kind: MetaContextKind;
}

/** Context ids are transient per the spec; fixed ids keep replies stable between INFO and GO. */
const ALLOCATION: MetaContext = { id: 1, name: BASE_ALLOCATION, kind: 'allocation' };
const DEPTH: MetaContext = { id: 2, name: QEMU_ALLOCATION_DEPTH, kind: 'depth' };

export function availableContexts(exp: ServedExport): MetaContext[] {
  return exp.allocationDepth ? [ALLOCATION, DEPTH] : [ALLOCATION];
}

/**
 * The contexts `queries` select on `exp`, each once, in a stable order. `listing` is
 * NBD_OPT_LIST_META_CONTEXT: no queries means everything, and empty leaves are wildcards.
 */
export function matchContexts(exp: ServedExport, queries: readonly string[], listing: boolean): MetaContext[] {
  const available = availableContexts(exp);
  if (queries.length === 0) return listing ? available : [];
  const chosen = new Set<MetaContext>();
  for (const q of queries) {
    const colon = q.indexOf(':');
    if (colon <= 0) continue;
    const ns = q.slice(0, colon);
    const leaf = q.slice(colon + 1);
    for (const ctx of available) {
      if (!ctx.name.startsWith(`${ns}:`)) continue;
      if (leaf === '' ? listing : ctx.name === q) chosen.add(ctx);
    }
  }
  return available.filter((c) => chosen.has(c));
}
