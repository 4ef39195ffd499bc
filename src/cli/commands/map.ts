// imgbd map: which ranges hold data, read as zeros, or are holes; qemu-img map's JSON shape.

import { EXTENT_HOLE, EXTENT_ZERO } from '../../block/device.js';
import { walkMap, type MapEntry } from '../../block/walk.js';
import { openSource } from '../lib/open-source.js';

interface MapOptions {
  format?: string;
  json?: boolean;
}

/** qemu-img map --output=json fields: depth counts from 0 at the top image. */
function toQemu(e: MapEntry): Record<string, unknown> {
  const present = e.depth > 0;
  return {
    start: e.offset,
    length: e.length,
    depth: Math.max(e.depth - 1, 0),
    present,
    zero: (e.flags & EXTENT_ZERO) !== 0,
    data: (e.flags & EXTENT_HOLE) === 0,
  };
}

function kind(e: MapEntry): string {
  if ((e.flags & EXTENT_HOLE) === 0) return (e.flags & EXTENT_ZERO) !== 0 ? 'data (reads as zeros)' : 'data';
  return (e.flags & EXTENT_ZERO) !== 0 ? 'hole' : 'hole (unspecified contents)';
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const o = opts as MapOptions;
  const { device } = await openSource(args[0]!, { format: o.format, readOnly: true });
  try {
    if (o.json) {
      const out: string[] = [];
      for await (const e of walkMap(device)) out.push(JSON.stringify(toQemu(e)));
      process.stdout.write(`[${out.join(',\n')}]\n`);
    } else {
      process.stdout.write(`${'Offset'.padEnd(20)}${'Length'.padEnd(20)}${'Depth'.padEnd(7)}Kind\n`);
      for await (const e of walkMap(device)) {
        process.stdout.write(`${`0x${e.offset.toString(16)}`.padEnd(20)}${`0x${e.length.toString(16)}`.padEnd(20)}${String(e.depth).padEnd(7)}${kind(e)}\n`);
      }
    }
  } finally {
    await device.close();
  }
  return 0;
}
