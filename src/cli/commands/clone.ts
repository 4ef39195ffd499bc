// imgbd clone BASE NEW: a qcow2 overlay over BASE that records BASE's format (so it is never
// probed when the overlay is opened) and names BASE relatively when both share a directory, so
// the pair can be moved together.

import { existsSync } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { UsageError } from '../../errors.js';
import { openImageWithFormat } from '../../formats/open.js';
import { createQcow2 } from '../../formats/qcow2/index.js';
import { parseOptionString, qcow2CreateOptions } from './create.js';

interface CloneOptions {
  format?: string;
  options?: string[];
  allowBacking?: string[];
  quiet?: boolean;
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const o = opts as CloneOptions;
  const [base, target] = args as [string, string];
  if (!existsSync(base)) throw new UsageError(`${base} does not exist: clone needs an existing base image`);
  if (existsSync(target)) throw new UsageError(`${target} already exists: pick a new file name (clone never overwrites)`);
  const absBase = resolve(base);
  const absTarget = resolve(target);
  if (absBase === absTarget) throw new UsageError('the clone must be a different file from its base');
  // The user names the base explicitly here, so its format is settled now (given, or probed by
  // magic) and written into the overlay; later opens never have to guess.
  const opened = await openImageWithFormat(absBase, { format: o.format, readOnly: true, ...(o.allowBacking?.length ? { allowBacking: o.allowBacking } : {}) });
  let sizeBytes: number;
  try {
    sizeBytes = opened.device.sizeBytes;
  } finally {
    await opened.device.close();
  }
  const backingFile = dirname(absBase) === dirname(absTarget) ? basename(absBase) : absBase;
  const q = qcow2CreateOptions(parseOptionString(o.options ?? []));
  await createQcow2(target, { ...q, sizeBytes, backingFile, backingFormat: opened.format });
  if (!o.quiet) {
    process.stdout.write(`${target}: qcow2 overlay over ${backingFile} (${opened.format}), ${sizeBytes} bytes\n`);
    if (backingFile === absBase) {
      process.stdout.write(`note: the base lies outside ${dirname(absTarget)}; serve the clone with --allow-backing ${dirname(absBase)}\n`);
    }
  }
  return 0;
}
