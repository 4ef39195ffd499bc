// imgbd info: an image (qemu-img info's JSON keys and order, --backing-chain as a JSON array) or
// an NBD export (nbdinfo's).

import { fstatSync, openSync, closeSync } from 'node:fs';
import { resolve } from 'node:path';
import { resolveBacking, topBackingPolicy, type BackingPolicy } from '../../formats/backing-policy.js';
import { openImageWithFormat } from '../../formats/open.js';
import { UsageError } from '../../errors.js';
import { exportJson, exportText } from '../lib/export-json.js';
import { formatSize, isNbdUri } from '../parse.js';

interface InfoOptions {
  format?: string;
  json?: boolean;
  backingChain?: boolean;
  allowBacking?: string[];
}

/** A driver may describe its image beyond size and format (qcow2: cluster size, backing...). */
interface Describable {
  imageInfo(): Record<string, unknown>;
}

function describable(x: unknown): x is Describable {
  return typeof (x as Partial<Describable>).imageInfo === 'function';
}

function actualSize(path: string): number {
  const fd = openSync(path, 'r');
  try {
    const st = fstatSync(fd);
    return st.isBlockDevice() ? 0 : st.blocks * 512;
  } finally {
    closeSync(fd);
  }
}

/** qemu-img's key order: what the driver adds before and after the common keys. */
const LEADING = ['backing-filename-format', 'snapshots'];

async function imageInfo(path: string, format: string | undefined): Promise<Record<string, unknown>> {
  // Nothing shown depends on the backing file's contents: it is named, not opened (as qemu-img
  // info does), so an overlay can be inspected before its backing file is trusted.
  const opened = await openImageWithFormat(path, { format, readOnly: true, ignoreBacking: true });
  try {
    const extra = describable(opened.device) ? opened.device.imageInfo() : {};
    const out: Record<string, unknown> = {};
    for (const k of LEADING) if (k in extra) out[k] = extra[k];
    out['virtual-size'] = opened.device.sizeBytes;
    out.filename = path;
    if ('cluster-size' in extra) out['cluster-size'] = extra['cluster-size'];
    out.format = opened.format;
    out['actual-size'] = actualSize(resolve(path));
    for (const [k, v] of Object.entries(extra)) if (!(k in out) && k !== 'dirty-flag') out[k] = v;
    out['dirty-flag'] = extra['dirty-flag'] ?? false;
    return out;
  } finally {
    await opened.device.close();
  }
}

/**
 * Every image of the chain, top first, each opened on its own; each backing name goes through
 * the backing policy before its file is opened.
 */
async function chainInfo(path: string, o: InfoOptions): Promise<Record<string, unknown>[]> {
  const allow = o.allowBacking ?? [];
  const top = await topBackingPolicy(path, allow);
  let policy = top as BackingPolicy;
  const out: Record<string, unknown>[] = [];
  let current = path;
  let format = o.format;
  for (;;) {
    const info = await imageInfo(current, format);
    out.push(info);
    const name = info['backing-filename'];
    if (typeof name !== 'string') return out;
    const r = await resolveBacking(current, name, policy);
    policy = r.next;
    current = String(info['full-backing-filename'] ?? r.path);
    format = typeof info['backing-filename-format'] === 'string' ? info['backing-filename-format'] : undefined;
  }
}

function imageText(info: Record<string, unknown>): string {
  const lines = [
    `image: ${String(info.filename)}`,
    `file format: ${String(info.format)}`,
    `virtual size: ${formatSize(info['virtual-size'] as number)} (${String(info['virtual-size'])} bytes)`,
    `disk size: ${formatSize(info['actual-size'] as number)}`,
  ];
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${String(info['cluster-size'])}`);
  if (typeof info['backing-filename'] === 'string') {
    const full = info['full-backing-filename'];
    lines.push(`backing file: ${info['backing-filename']}${full !== info['backing-filename'] ? ` (actual path: ${String(full)})` : ''}`);
  }
  if (typeof info['backing-filename-format'] === 'string') lines.push(`backing file format: ${info['backing-filename-format']}`);
  const snaps = info.snapshots as Record<string, unknown>[] | undefined;
  if (snaps && snaps.length > 0) {
    lines.push('Snapshot list:', 'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT');
    for (const s of snaps) {
      const date = new Date(Number(s['date-sec']) * 1000).toISOString().replace('T', ' ').slice(0, 19);
      lines.push(`${String(s.id).padEnd(10)}${String(s.name).padEnd(18)}${String(s['vm-state-size']).padStart(7)} B ${date}`);
    }
  }
  if (info['dirty-flag'] === true) lines.push('dirty flag: true');
  const fs = info['format-specific'] as { data?: Record<string, unknown> } | undefined;
  if (fs?.data) {
    lines.push('Format specific information:');
    for (const [k, v] of Object.entries(fs.data)) lines.push(`    ${k.replace(/-/g, ' ')}: ${String(v)}`);
  }
  return `${lines.join('\n')}\n`;
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const o = opts as InfoOptions;
  const target = args[0]!;
  if (isNbdUri(target)) {
    if (o.backingChain) throw new UsageError('--backing-chain applies to image files, not NBD exports');
    const { NbdClient } = await import('../../client/index.js');
    const info = await NbdClient.info(target);
    const contexts = await NbdClient.listMetaContexts(target).catch(() => []);
    process.stdout.write(o.json ? `${JSON.stringify(exportJson(info, contexts), null, 2)}\n` : exportText(info, contexts));
    return 0;
  }
  if (o.backingChain) {
    const chain = await chainInfo(target, o);
    process.stdout.write(o.json ? `${JSON.stringify(chain, null, 4)}\n` : chain.map(imageText).join('\n'));
    return 0;
  }
  const info = await imageInfo(target, o.format);
  process.stdout.write(o.json ? `${JSON.stringify(info, null, 4)}\n` : imageText(info));
  return 0;
}
