// A partitioned disk image with a formatted, populated filesystem, built without root and
// without a kernel device: the filesystem is made in a temporary raw file by its own tools
// (mke2fs -d for ext4, mkfs.xfs -p with a proto file generated from the directory, mkfs.vfat
// then mcopy -s for vfat), the partition table is written by partition-writer.ts, and the
// filesystem is copied, sparse, at the partition's offset into a new image of any format
// through the BlockDevice interface.

import { execFile } from 'node:child_process';
import { lstat, mkdtemp, readdir, readlink, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import '../formats/registry.js';
import { Backend } from '../block/backend.js';
import { offsetFilter } from '../block/filters/offset.js';
import { ImgbdError, UsageError } from '../errors.js';
import { openImageWithFormat } from '../formats/open.js';
import { openRaw } from '../formats/raw/driver.js';
import { HostFile } from '../io/host-file.js';
import { createImage, type ImageCreateOptions } from './create-target.js';
import { GPT_TYPE, MBR_TYPE, planSinglePartition, type PartitionPlan } from './partition-writer.js';
import { deviceTarget, transfer } from './transfer.js';

const execFileAsync = promisify(execFile);

export const ROOTFS_TYPES = ['ext4', 'xfs', 'vfat'] as const;
export type RootfsType = (typeof ROOTFS_TYPES)[number];

export class RootfsToolError extends ImgbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_ROOTFS_TOOL', message, options);
  }
}

export interface RootfsOptions {
  readonly image: string;
  /** Target image format (raw, qcow2, qed, vdi). */
  readonly format: string;
  readonly sizeBytes: number;
  readonly partition: 'gpt' | 'mbr';
  readonly fs: RootfsType;
  /** Populate the filesystem from this directory. */
  readonly fromDir?: string;
  readonly label?: string;
  readonly create?: ImageCreateOptions;
  /** Where the temporary filesystem file is built (default the OS temporary directory). */
  readonly tmpDir?: string;
}

export interface RootfsResult {
  readonly partition: PartitionPlan['scheme'];
  readonly partitionOffsetBytes: number;
  readonly partitionSizeBytes: number;
  readonly writtenBytes: number;
}

async function tool(cmd: string, args: string[], env?: NodeJS.ProcessEnv): Promise<void> {
  try {
    await execFileAsync(cmd, args, { env: { ...process.env, ...env }, maxBuffer: 16 * 1024 * 1024 });
  } catch (err) {
    const e = err as { code?: unknown; stderr?: string };
    if (e.code === 'ENOENT') throw new RootfsToolError(`${cmd} is not installed (needed for this filesystem)`, { cause: err });
    throw new RootfsToolError(`${cmd} failed: ${(e.stderr ?? String(err)).trim()}`, { cause: err });
  }
}

/** mkfs.xfs proto file (mkfs.xfs(8) "-p"): one line per entry, directories closed by "$". */
export async function xfsProtoFile(dir: string): Promise<string> {
  const lines: string[] = ['/dev/null', '0 0'];
  const mode = (type: string, m: number): string => `${type}${m & 0o4000 ? 'u' : '-'}${m & 0o2000 ? 'g' : '-'}${(m & 0o777).toString(8).padStart(3, '0')}`;
  const walk = async (path: string, depth: number): Promise<void> => {
    const pad = ' '.repeat(depth);
    for (const name of (await readdir(path)).sort()) {
      if (/\s/.test(name) || name === '$') throw new UsageError(`mkfs.xfs proto files cannot name ${JSON.stringify(join(path, name))} (whitespace)`);
      const full = join(path, name);
      const st = await lstat(full);
      const own = `${st.uid} ${st.gid}`;
      if (st.isDirectory()) {
        lines.push(`${pad}${name} ${mode('d', st.mode)} ${own}`);
        await walk(full, depth + 1);
        lines.push(`${pad}$`);
      } else if (st.isFile()) {
        if (/\s/.test(full)) throw new UsageError(`mkfs.xfs proto files cannot read ${JSON.stringify(full)} (whitespace in the path)`);
        lines.push(`${pad}${name} ${mode('-', st.mode)} ${own} ${full}`);
      } else if (st.isSymbolicLink()) {
        const target = await readlink(full);
        if (/\s/.test(target)) throw new UsageError(`mkfs.xfs proto files cannot hold the symlink target ${JSON.stringify(target)}`);
        lines.push(`${pad}${name} ${mode('l', st.mode)} ${own} ${target}`);
      } else if (st.isFIFO()) {
        lines.push(`${pad}${name} ${mode('p', st.mode)} ${own}`);
      } else if (st.isBlockDevice() || st.isCharacterDevice()) {
        const major = Math.floor(st.rdev / 256) & 0xfff;
        const minor = (st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00);
        lines.push(`${pad}${name} ${mode(st.isBlockDevice() ? 'b' : 'c', st.mode)} ${own} ${major} ${minor}`);
      }
      // Sockets cannot be represented and are left out, as mke2fs -d does.
    }
  };
  const root = dir === '' ? null : await lstat(dir);
  lines.push(`${mode('d', root ? root.mode : 0o755)} ${root ? `${root.uid} ${root.gid}` : '0 0'}`);
  if (root) await walk(dir, 1);
  lines.push('$', '');
  return lines.join('\n');
}

/** Build the filesystem into `file` (a sparse raw file of the partition's size). */
export async function makeFilesystem(file: string, fs: RootfsType, o: { fromDir?: string; label?: string; workDir: string }): Promise<void> {
  const label = o.label;
  if (fs === 'ext4') {
    if (label !== undefined && Buffer.byteLength(label) > 16) throw new UsageError('ext4 labels are at most 16 bytes');
    await tool('mke2fs', ['-q', '-F', '-t', 'ext4', ...(label !== undefined ? ['-L', label] : []), ...(o.fromDir !== undefined ? ['-d', o.fromDir] : []), file]);
  } else if (fs === 'xfs') {
    if (label !== undefined && Buffer.byteLength(label) > 12) throw new UsageError('xfs labels are at most 12 bytes');
    const args = ['-q', '-f', ...(label !== undefined ? ['-L', label] : [])];
    if (o.fromDir !== undefined) {
      const proto = join(o.workDir, 'proto');
      await writeFile(proto, await xfsProtoFile(o.fromDir));
      args.push('-p', proto);
    }
    await tool('mkfs.xfs', [...args, file]);
  } else {
    if (label !== undefined && Buffer.byteLength(label) > 11) throw new UsageError('vfat labels are at most 11 bytes');
    await tool('mkfs.vfat', [...(label !== undefined ? ['-n', label] : []), file]);
    if (o.fromDir !== undefined) {
      const entries = (await readdir(o.fromDir)).map((n) => join(o.fromDir!, n));
      if (entries.length > 0) await tool('mcopy', ['-i', file, '-s', '-p', '-Q', '-m', ...entries, '::/'], { MTOOLS_SKIP_CHECK: '1' });
    }
  }
}

export async function createRootfsImage(o: RootfsOptions): Promise<RootfsResult> {
  if (!(ROOTFS_TYPES as readonly string[]).includes(o.fs)) throw new UsageError(`--fs ${o.fs}: use ${ROOTFS_TYPES.join(', ')}`);
  if (o.partition !== 'gpt' && o.partition !== 'mbr') throw new UsageError(`--partition ${String(o.partition)}: use gpt or mbr`);
  const sizeBytes = Math.ceil(o.sizeBytes / 512) * 512;
  const plan = planSinglePartition(sizeBytes, o.partition, {
    gptType: o.fs === 'vfat' ? GPT_TYPE.MICROSOFT_BASIC_DATA : GPT_TYPE.LINUX_FILESYSTEM,
    mbrType: o.fs === 'vfat' ? MBR_TYPE.FAT32_LBA : MBR_TYPE.LINUX,
    name: o.label ?? o.fs,
  });
  const work = await mkdtemp(join(o.tmpDir ?? tmpdir(), 'imgbd-rootfs-'));
  try {
    const fsFile = join(work, 'fs.img');
    const f = await HostFile.open(fsFile, { create: true });
    try {
      await f.truncate(plan.sizeBytes);
    } finally {
      await f.close();
    }
    await makeFilesystem(fsFile, o.fs, { fromDir: o.fromDir, label: o.label, workDir: work });
    await createImage(o.image, o.format, sizeBytes, o.create);
    const src = await openRaw(fsFile, { readOnly: true });
    const dst = (await openImageWithFormat(o.image, { format: o.format, readOnly: false })).device;
    try {
      const backend = new Backend(dst);
      for (const w of plan.writes) await backend.pwrite(w.data, w.offset);
      const window = offsetFilter(backend, { offsetBytes: plan.offsetBytes, sizeBytes: plan.sizeBytes });
      const stats = await transfer({
        sources: [src],
        targets: [deviceTarget(window)],
        requestBytes: 2 * 1024 * 1024,
        workers: 8,
        grainBytes: Math.min(2 * 1024 * 1024, Math.max(4096, dst.blockSizes().preferred)),
        targetZeroed: true,
      });
      await backend.flush();
      return { partition: plan.scheme, partitionOffsetBytes: plan.offsetBytes, partitionSizeBytes: plan.sizeBytes, writtenBytes: stats.writtenBytes };
    } finally {
      await dst.close();
      await src.close();
    }
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
