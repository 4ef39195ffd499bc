// imgbd create: qemu-img create's spelling (-f, -b, -F, -o key=value,...) for qcow2 and raw.
// With -b the size may be left out: it is the backing file's virtual size.

import { existsSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { UsageError } from '../../errors.js';
import { HostFile } from '../../io/host-file.js';
import { openImageWithFormat } from '../../formats/open.js';
import { probeFormat, readProbeHead } from '../../formats/probe.js';
import { createQcow2, type Qcow2CreateOptions } from '../../formats/qcow2/index.js';
import { fallocate } from '../../sys/libc.js';
import { formatSize, parseCount, parseSize } from '../parse.js';

interface CreateOptions {
  format?: string;
  backing?: string;
  backingFormat?: string;
  options?: string[];
  quiet?: boolean;
  allowBacking?: string[];
  unsafe?: boolean;
}

/** Split "a=1,b=2" (a doubled comma is a literal comma, as in qemu's option parser). */
export function parseOptionString(texts: readonly string[]): Map<string, string> {
  const out = new Map<string, string>();
  for (const text of texts) {
    const parts = text.replace(/,,/g, '\u0000').split(',').map((p) => p.replace(/\u0000/g, ','));
    for (const p of parts) {
      if (p === '') continue;
      const eq = p.indexOf('=');
      if (eq <= 0) throw new UsageError(`invalid -o option '${p}': use key=value (e.g. -o cluster_size=64k,compat=1.1)`);
      out.set(p.slice(0, eq).trim(), p.slice(eq + 1));
    }
  }
  return out;
}

function parseOnOff(key: string, v: string): boolean {
  if (['on', 'true', 'yes'].includes(v)) return true;
  if (['off', 'false', 'no'].includes(v)) return false;
  throw new UsageError(`-o ${key}=${v}: expected on or off`);
}

const QCOW2_KEYS = ['cluster_size', 'compat', 'extended_l2', 'compression_type', 'lazy_refcounts', 'preallocation', 'data_file', 'refcount_bits', 'backing_file', 'backing_fmt', 'size'];
const RAW_KEYS = ['preallocation', 'size'];

/** Turn -o options into createQcow2's options (size and backing filled in by the caller). */
export function qcow2CreateOptions(o: Map<string, string>): Omit<Qcow2CreateOptions, 'sizeBytes'> {
  for (const k of o.keys()) {
    if (!QCOW2_KEYS.includes(k)) throw new UsageError(`qcow2 has no creation option '${k}' (known: ${QCOW2_KEYS.join(', ')})`);
  }
  const compatText = o.get('compat');
  let compat: '0.10' | '1.1' | undefined;
  if (compatText !== undefined) {
    if (compatText === '0.10' || compatText === 'v2') compat = '0.10';
    else if (compatText === '1.1' || compatText === 'v3') compat = '1.1';
    else throw new UsageError(`-o compat=${compatText}: use 0.10 (qcow2 version 2) or 1.1 (version 3)`);
  }
  const ct = o.get('compression_type');
  if (ct !== undefined && ct !== 'zlib' && ct !== 'zstd') throw new UsageError(`-o compression_type=${ct}: use zlib or zstd`);
  const pre = o.get('preallocation');
  if (pre !== undefined && !['off', 'metadata', 'falloc', 'full'].includes(pre)) {
    throw new UsageError(`-o preallocation=${pre}: use off, metadata, falloc or full`);
  }
  return {
    compat,
    clusterSize: o.has('cluster_size') ? parseSize(o.get('cluster_size')!, 'cluster_size') : undefined,
    extendedL2: o.has('extended_l2') ? parseOnOff('extended_l2', o.get('extended_l2')!) : undefined,
    lazyRefcounts: o.has('lazy_refcounts') ? parseOnOff('lazy_refcounts', o.get('lazy_refcounts')!) : undefined,
    compressionType: ct,
    refcountBits: o.has('refcount_bits') ? parseCount(o.get('refcount_bits')!, 'refcount_bits', 1, 64) : undefined,
    preallocation: pre as Qcow2CreateOptions['preallocation'],
    dataFile: o.get('data_file'),
  };
}

/** The size of the backing file (read-only open; the format given, else probed by magic). */
async function backingSize(file: string, backing: string, format: string, allowBacking: readonly string[]): Promise<number> {
  const path = isAbsolute(backing) ? backing : resolve(dirname(resolve(file)), backing);
  if (!existsSync(path)) throw new UsageError(`backing file ${path} does not exist (a relative -b is relative to the new image's directory)`);
  const opened = await openImageWithFormat(path, { format, readOnly: true, ...(allowBacking.length > 0 ? { allowBacking } : {}) });
  try {
    return opened.device.sizeBytes;
  } finally {
    await opened.device.close();
  }
}

async function createRaw(path: string, sizeBytes: number, o: Map<string, string>): Promise<void> {
  for (const k of o.keys()) if (!RAW_KEYS.includes(k)) throw new UsageError(`raw has no creation option '${k}' (known: ${RAW_KEYS.join(', ')})`);
  const pre = o.get('preallocation') ?? 'off';
  if (!['off', 'falloc', 'full'].includes(pre)) throw new UsageError(`-o preallocation=${pre}: raw takes off, falloc or full`);
  const f = await HostFile.open(path, { create: true });
  try {
    await f.truncate(0);
    await f.truncate(sizeBytes);
    if (pre === 'falloc' && sizeBytes > 0) await fallocate(f.fd, 0, 0, sizeBytes);
    if (pre === 'full') {
      const chunk = Buffer.alloc(Math.min(sizeBytes, 4 * 1024 * 1024));
      for (let off = 0; off < sizeBytes; off += chunk.length) await f.pwrite(chunk.subarray(0, Math.min(chunk.length, sizeBytes - off)), off);
    }
    await f.datasync();
  } finally {
    await f.close();
  }
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const c = opts as CreateOptions;
  // --partition/--fs: a partitioned image with a populated filesystem (src/image/rootfs.ts).
  if (opts.partition !== undefined || opts.fs !== undefined) return (await import('./create-rootfs.js')).run(args, opts);
  const [file, sizeText] = args as [string, string | undefined];
  const format = c.format ?? 'raw';
  const o = parseOptionString(c.options ?? []);
  const backing = c.backing ?? o.get('backing_file');
  const backingFormat = c.backingFormat ?? o.get('backing_fmt');
  o.delete('backing_file');
  o.delete('backing_fmt');
  const sizeOpt = sizeText ?? o.get('size');
  o.delete('size');

  let sizeBytes: number;
  if (format === 'raw') {
    if (backing !== undefined) throw new UsageError('raw images have no backing file: use -f qcow2 with -b');
    if (sizeOpt === undefined) throw new UsageError('raw needs a SIZE, e.g. imgbd create -f raw disk.img 10G');
    sizeBytes = parseSize(sizeOpt);
    await createRaw(file, sizeBytes, o);
  } else if (format === 'qcow2') {
    const q = qcow2CreateOptions(o);
    const bfmt = backingFormat;
    if (backing !== undefined && bfmt === undefined && !c.unsafe) {
      const path = isAbsolute(backing) ? backing : resolve(dirname(resolve(file)), backing);
      const looks = existsSync(path) ? probeFormat(await readProbeHead(path)) : undefined;
      throw new UsageError(`-b needs the backing format too, so it is recorded rather than guessed later: add -F ${looks ?? 'FORMAT'}`);
    }
    if (sizeOpt !== undefined) sizeBytes = parseSize(sizeOpt);
    else if (backing !== undefined && c.unsafe) throw new UsageError('-u does not open the backing file, so SIZE must be given');
    else if (backing !== undefined) sizeBytes = await backingSize(file, backing, bfmt!, c.allowBacking ?? []);
    else throw new UsageError('qcow2 needs a SIZE unless -b gives a backing file to take it from, e.g. imgbd create -f qcow2 disk.qcow2 10G');
    await createQcow2(file, { ...q, sizeBytes, backingFile: backing, backingFormat: bfmt });
  } else {
    throw new UsageError(`imgbd create makes raw and qcow2 images, not '${format}'`);
  }
  if (!c.quiet) {
    const extra = backing !== undefined ? ` backing_file=${backing} backing_fmt=${String(backingFormat)}` : '';
    process.stdout.write(`Formatting '${file}', fmt=${format} size=${sizeBytes} (${formatSize(sizeBytes)})${extra}\n`);
  }
  return 0;
}
