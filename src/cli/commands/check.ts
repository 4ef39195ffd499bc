// imgbd check: qemu-img check's report, JSON keys and exit codes (qemu-img.rst, "check"):
// 0 clean, 1 the check could not finish, 2 corruptions, 3 leaks only, 63 format without checks.

import { CorruptImageError, UsageError } from '../../errors.js';
import { probeFormat, readProbeHead } from '../../formats/probe.js';
import { openQcow2Path, type CheckMode, type CheckResult } from '../../formats/qcow2/index.js';
import { openQedPath } from '../../formats/qed/format.js';
import { openVdiPath } from '../../formats/vdi/format.js';

interface CheckOptions {
  format?: string;
  repair?: string;
  json?: boolean;
  quiet?: boolean;
}

export const CHECK_EXIT = { CLEAN: 0, FAILED: 1, CORRUPT: 2, LEAKS: 3, UNSUPPORTED: 63 } as const;

function exitFor(r: CheckResult): number {
  if (r.corruptions > 0) return CHECK_EXIT.CORRUPT;
  if (r.leaks > 0) return CHECK_EXIT.LEAKS;
  return CHECK_EXIT.CLEAN;
}

/** qemu-img's ImageCheck keys, omitting zero counters as qemu does. */
function checkJson(file: string, format: string, r: CheckResult, checkErrors: number): Record<string, unknown> {
  const o: Record<string, unknown> = { 'image-end-offset': r.imageEndOffset, 'total-clusters': r.totalClusters, 'check-errors': checkErrors };
  if (r.corruptions > 0) o.corruptions = r.corruptions;
  if (r.leaks > 0) o.leaks = r.leaks;
  if (r.corruptionsFixed > 0) o['corruptions-fixed'] = r.corruptionsFixed;
  if (r.leaksFixed > 0) o['leaks-fixed'] = r.leaksFixed;
  if (r.allocatedClusters > 0) o['allocated-clusters'] = r.allocatedClusters;
  if (r.fragmentedClusters > 0) o['fragmented-clusters'] = r.fragmentedClusters;
  if (r.compressedClusters > 0) o['compressed-clusters'] = r.compressedClusters;
  o.filename = file;
  o.format = format;
  return o;
}

function pct(n: number, total: number): string {
  return total === 0 ? '0.00' : ((n * 100) / total).toFixed(2);
}

function checkText(r: CheckResult): string {
  const lines: string[] = [...r.messages];
  if (r.leaksFixed > 0 || r.corruptionsFixed > 0) {
    lines.push('The following inconsistencies were found and repaired:', '', `    ${r.leaksFixed} leaked clusters`, `    ${r.corruptionsFixed} corruptions`, '');
  }
  if (r.corruptions > 0) {
    lines.push(`${r.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
    lines.push("Run 'imgbd check -r all FILE' on a copy of the image to repair it.");
  }
  if (r.leaks > 0) {
    lines.push(`${r.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
    if (r.corruptions === 0) lines.push("Run 'imgbd check -r leaks FILE' to reclaim them.");
  }
  if (r.corruptions === 0 && r.leaks === 0) lines.push('No errors were found on the image.');
  if (r.totalClusters > 0) {
    lines.push(
      `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ` +
        `${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters`,
    );
  }
  lines.push(`Image end offset: ${r.imageEndOffset}`);
  return `${lines.join('\n')}\n`;
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const o = opts as CheckOptions;
  const file = args[0]!;
  let mode: CheckMode = 'none';
  if (o.repair !== undefined) {
    if (o.repair !== 'leaks' && o.repair !== 'all') throw new UsageError(`-r ${o.repair}: use -r leaks (reclaim leaked clusters) or -r all (also fix corruptions)`);
    mode = o.repair;
  }
  const head = await readProbeHead(file);
  const format = o.format ?? probeFormat(head);
  if (format === 'qed' || format === 'vdi') return checkOther(file, format, mode, o);
  if (format !== 'qcow2') {
    process.stderr.write(`imgbd: ${format} images have no metadata to check (qcow2, qed and vdi are checked)\n`);
    return CHECK_EXIT.UNSUPPORTED;
  }
  // Header bytes 4-7: version; 72-79: incompatible features, bit 0 = dirty (qcow2.txt).
  const dirty = head.readUInt32BE(4) >= 3 && (head.readBigUInt64BE(72) & 1n) === 1n;
  if (dirty && mode !== 'none') {
    process.stderr.write(`imgbd: ${file} was left dirty with lazy refcounts: its refcounts are rebuilt on the writable open, before the check\n`);
  }
  let dev;
  try {
    // The backing file holds no metadata of this image: not opened, so no policy applies.
    dev = await openQcow2Path(file, { readOnly: mode === 'none', ignoreBacking: true });
  } catch (err) {
    if (err instanceof CorruptImageError) {
      process.stderr.write(`imgbd: ${file}: ${err.message}\nThe image cannot be opened, so it cannot be checked: restore it from a copy.\n`);
      return CHECK_EXIT.FAILED;
    }
    throw err;
  }
  try {
    let r: CheckResult;
    try {
      r = await dev.check(mode);
    } catch (err) {
      if (o.json) process.stdout.write(`${JSON.stringify({ filename: file, format, 'check-errors': 1 }, null, 4)}\n`);
      process.stderr.write(`imgbd: check failed: ${err instanceof Error ? err.message : String(err)}\n`);
      return CHECK_EXIT.FAILED;
    }
    if (o.json) process.stdout.write(`${JSON.stringify(checkJson(file, format, r, 0), null, 4)}\n`);
    else if (!o.quiet) process.stdout.write(checkText(r));
    return exitFor(r);
  } finally {
    await dev.close();
  }
}

/** qed and vdi: report only (qed repairs itself on a writable open when its need-check bit is set). */
async function checkOther(file: string, format: 'qed' | 'vdi', mode: CheckMode, o: CheckOptions): Promise<number> {
  if (mode !== 'none') throw new UsageError(`-r is for qcow2 images; ${format} images are reported on, not repaired, by imgbd check`);
  let corruptions: number;
  let leaks = 0;
  let problems: readonly string[] = [];
  if (format === 'qed') {
    const dev = await openQedPath(file, { readOnly: true, ignoreBacking: true });
    try {
      const r = await dev.check();
      corruptions = r.invalidEntries + r.duplicateReferences;
      leaks = r.leakedClusters;
      problems = r.problems;
    } finally {
      await dev.close();
    }
  } else {
    const dev = await openVdiPath(file, { readOnly: true });
    try {
      const r = dev.check();
      corruptions = r.corruptions;
      if (r.corruptions > 0) problems = [`ERROR: blocks_allocated is ${r.blocksAllocated} but the block map uses ${r.mappedBlocks} blocks`];
    } finally {
      await dev.close();
    }
  }
  if (o.json) {
    const j: Record<string, unknown> = { 'check-errors': 0 };
    if (corruptions > 0) j.corruptions = corruptions;
    if (leaks > 0) j.leaks = leaks;
    j.filename = file;
    j.format = format;
    process.stdout.write(`${JSON.stringify(j, null, 4)}\n`);
  } else if (!o.quiet) {
    const lines = [...problems];
    if (corruptions > 0) lines.push(`${corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
    if (leaks > 0) lines.push(`${leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
    if (corruptions === 0 && leaks === 0) lines.push('No errors were found on the image.');
    process.stdout.write(`${lines.join('\n')}\n`);
  }
  return corruptions > 0 ? CHECK_EXIT.CORRUPT : leaks > 0 ? CHECK_EXIT.LEAKS : CHECK_EXIT.CLEAN;
}
