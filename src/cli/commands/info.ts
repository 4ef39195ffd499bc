// imgbd info: an image (qemu-img info's JSON keys) or an NBD export (nbdinfo's).

import { fstatSync, openSync, closeSync } from 'node:fs';
import { resolve } from 'node:path';
import { NbdClient } from '../../client/index.js';
import { openImageWithFormat } from '../../formats/open.js';
import { exportJson, exportText } from '../lib/export-json.js';
import { formatSize, isNbdUri } from '../parse.js';

interface InfoOptions {
  format?: string;
  json?: boolean;
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

async function imageInfo(path: string, o: InfoOptions): Promise<Record<string, unknown>> {
  const opened = await openImageWithFormat(path, { format: o.format, readOnly: true });
  try {
    const extra = describable(opened.device) ? opened.device.imageInfo() : {};
    return {
      'virtual-size': opened.device.sizeBytes,
      filename: path,
      format: opened.format,
      'actual-size': actualSize(resolve(path)),
      'dirty-flag': false,
      ...extra,
    };
  } finally {
    await opened.device.close();
  }
}

function imageText(info: Record<string, unknown>): string {
  const lines = [
    `image: ${String(info.filename)}`,
    `file format: ${String(info.format)}`,
    `virtual size: ${formatSize(info['virtual-size'] as number)} (${String(info['virtual-size'])} bytes)`,
    `disk size: ${formatSize(info['actual-size'] as number)}`,
  ];
  for (const [k, v] of Object.entries(info)) {
    if (['filename', 'format', 'virtual-size', 'actual-size', 'dirty-flag'].includes(k)) continue;
    lines.push(`${k}: ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`);
  }
  return `${lines.join('\n')}\n`;
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const o = opts as InfoOptions;
  const target = args[0]!;
  if (isNbdUri(target)) {
    const info = await NbdClient.info(target);
    const contexts = await NbdClient.listMetaContexts(target).catch(() => []);
    process.stdout.write(o.json ? `${JSON.stringify(exportJson(info, contexts), null, 2)}\n` : exportText(info, contexts));
    return 0;
  }
  const info = await imageInfo(target, o);
  process.stdout.write(o.json ? `${JSON.stringify(info, null, 2)}\n` : imageText(info));
  return 0;
}
