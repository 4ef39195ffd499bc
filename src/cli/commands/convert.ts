// imgbd convert: qemu-img convert's spelling (-f, -O, -c, -o, -B, -F, -m, -W, -n, -p) between
// raw, qcow2, qed and vdi images and NBD URIs. The work is in src/image/convert.ts.

import { progressBar } from '../lib/progress.js';
import { UsageError } from '../../errors.js';
import type { ImageCreateOptions } from '../../image/create-target.js';
import { convertImage } from '../../image/convert.js';
import { parseCount, parseSize } from '../parse.js';
import { parseOptionString, qcow2CreateOptions } from './create.js';
import { isTerminal } from '../../sys/libc.js';

interface ConvertCliOptions {
  format?: string;
  outputFormat?: string;
  compress?: boolean;
  options?: string[];
  backing?: string;
  backingFormat?: string;
  coroutines?: string;
  outOfOrder?: boolean;
  skipCreate?: boolean;
  progress?: boolean;
  threads?: string;
  cache?: string;
  allowBacking?: string[];
  json?: boolean;
  quiet?: boolean;
}

/** -o key=value,... for the target format; compression_type is the only one -c cares about. */
export function imageCreateOptionsFor(format: string, texts: readonly string[]): ImageCreateOptions & { backingFile?: string; backingFormat?: string } {
  const o = parseOptionString(texts);
  const backingFile = o.get('backing_file');
  const backingFormat = o.get('backing_fmt');
  o.delete('backing_file');
  o.delete('backing_fmt');
  const base = { ...(backingFile !== undefined ? { backingFile } : {}), ...(backingFormat !== undefined ? { backingFormat } : {}) };
  const only = (keys: string[]): void => {
    for (const k of o.keys()) if (!keys.includes(k)) throw new UsageError(`${format} has no creation option '${k}' (known: ${keys.join(', ') || 'none'})`);
  };
  switch (format) {
    case 'qcow2':
      return { ...base, qcow2: qcow2CreateOptions(o) };
    case 'qed':
      only(['cluster_size', 'table_size']);
      return {
        ...base,
        qed: {
          clusterSize: o.has('cluster_size') ? parseSize(o.get('cluster_size')!, 'cluster_size') : undefined,
          tableSize: o.has('table_size') ? parseCount(o.get('table_size')!, 'table_size', 1, 16) : undefined,
        },
      };
    case 'vdi':
      only(['static']);
      return { ...base, vdi: { static: o.has('static') ? ['on', 'true', 'yes'].includes(o.get('static')!) : undefined } };
    default:
      only([]);
      return base;
  }
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const c = opts as ConvertCliOptions;
  const [source, target] = args as [string, string];
  const targetFormat = c.outputFormat ?? 'raw';
  const create = imageCreateOptionsFor(targetFormat, c.options ?? []);
  const backingFile = c.backing ?? create.backingFile;
  const backingFormat = c.backingFormat ?? create.backingFormat;
  if (backingFile !== undefined && backingFormat === undefined) throw new UsageError('-B needs the backing format too (-F FORMAT), so it is recorded rather than guessed');
  const workers = c.coroutines !== undefined ? parseCount(c.coroutines, '-m', 1, 64) : undefined;
  const threads = c.threads !== undefined ? parseCount(c.threads, '--threads', 1, 256) : undefined;
  if (c.cache !== undefined && c.cache !== 'writeback' && c.cache !== 'unsafe') throw new UsageError(`-t ${c.cache}: use unsafe (no flush, the default) or writeback (flush before exiting)`);
  const showProgress = c.quiet !== true && (c.progress === true || isTerminal(2));
  const bar = await progressBar('converting', showProgress, true);
  let started = false;
  const started0 = Date.now();
  const r = await convertImage({
    source,
    sourceFormat: c.format,
    target,
    targetFormat,
    create: { ...create, ...(backingFile !== undefined ? { backingFile, backingFormat } : {}) },
    compress: c.compress === true,
    workers,
    threads,
    skipCreate: c.skipCreate === true,
    // As qemu-img: its convert target's cache mode is "unsafe" unless -t says otherwise.
    noFlush: c.cache !== 'writeback',
    ...(c.allowBacking ? { allowBacking: c.allowBacking } : {}),
    onProgress: (done, total) => {
      if (!bar) return;
      if (!started) {
        bar.start(Math.ceil(total / 2 ** 20), 0);
        started = true;
      }
      bar.update(Math.floor(done / 2 ** 20));
    },
  });
  if (bar && started) {
    bar.update(Math.ceil(r.sizeBytes / 2 ** 20));
    bar.stop();
  }
  if (c.json) {
    const out = { 'virtual-size': r.sizeBytes, format: r.targetFormat, 'read-bytes': r.readBytes, 'written-bytes': r.writtenBytes, 'zeroed-bytes': r.zeroedBytes, seconds: (Date.now() - started0) / 1000 };
    process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
  }
  return 0;
}
