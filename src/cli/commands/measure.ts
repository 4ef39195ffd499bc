// imgbd measure: qemu-img measure's output (qemu-img.rst "measure"): "required size" and
// "fully allocated size", or with --json / --output=json {"required", "fully-allocated"}.

import { UsageError } from '../../errors.js';
import { measureImage } from '../../image/measure.js';
import { openTarget } from '../../image/open.js';
import { parseSize } from '../parse.js';
import { imageCreateOptionsFor } from './convert.js';

interface MeasureCliOptions {
  size?: string;
  format?: string;
  outputFormat?: string;
  options?: string[];
  json?: boolean;
  output?: string;
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const c = opts as MeasureCliOptions;
  const src = args[0];
  if ((src === undefined) === (c.size === undefined)) throw new UsageError('give either --size SIZE or a source image');
  if (c.output !== undefined && c.output !== 'json' && c.output !== 'human') throw new UsageError(`--output ${c.output}: use human or json`);
  const json = c.json === true || c.output === 'json';
  const format = c.outputFormat ?? 'raw';
  const create = imageCreateOptionsFor(format, c.options ?? []);
  const qcow2 = format === 'qcow2' ? { ...create.qcow2, ...(create.backingFile !== undefined ? { backingFile: create.backingFile } : {}) } : undefined;
  const opened = src !== undefined ? await openTarget(src, { format: c.format, readOnly: true }) : undefined;
  try {
    const r = await measureImage({ source: opened?.device, sourceFormat: opened?.format, sizeBytes: c.size !== undefined ? parseSize(c.size) : undefined, format, qcow2 });
    if (json) process.stdout.write(`${JSON.stringify(r, null, 4)}\n`);
    else process.stdout.write(`required size: ${r.required}\nfully allocated size: ${r['fully-allocated']}\n${r.bitmaps !== undefined ? `bitmaps size: ${r.bitmaps}\n` : ''}`);
    return 0;
  } finally {
    await opened?.device.close();
  }
}
