// Filesystems made by the real mkfs tools, placed inside a GPT partition (sfdisk) and also
// probed as whole images; our verdict is compared with `blkid -p -o export` on the same bytes
// (`--offset/--size` for the partition). Swap and LUKS must be recognised and refused.

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, openSync, closeSync, readSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { DEFAULT_BLOCK_SIZES, type BlockDevice } from '../../src/block/device.js';
import { offsetFilter } from '../../src/block/filters/offset.js';
import { UnsupportedImageError } from '../../src/errors.js';
import { probeFilesystem, probeMountableFilesystem } from '../../src/fs/probe.js';
import { HostFile } from '../../src/io/host-file.js';
import { openPartition } from '../../src/partition/open.js';
import { findPartition, readPartitions } from '../../src/partition/table.js';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';

async function openDevice(t: TestContext, path: string): Promise<BlockDevice> {
  const f = await HostFile.open(path, { readOnly: true });
  t.after(() => f.close());
  const sizeBytes = await f.size();
  return {
    sizeBytes,
    capabilities: () => ({ writable: false, flush: false, fua: false, trim: false, zero: false, fastZero: false, extents: false, allocationDepth: false, cache: false, multiConn: true, rotational: false }),
    blockSizes: () => DEFAULT_BLOCK_SIZES,
    pread: (buf, off) => f.pread(buf, off),
    close: () => f.close(),
  };
}

function parseExport(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) out[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return out;
}

interface Case {
  readonly name: string;
  readonly peers: readonly string[];
  readonly sizeMiB: number;
  /** Make the filesystem in `fs` (a sparse file of sizeMiB, or absent for tools that create it); `src` is a small directory tree. */
  readonly make: (fs: string, src: string) => Promise<unknown>;
  readonly mountable: boolean;
}

const passphrase = 'not a secret';

const cases: Case[] = [
  { name: 'ext2', peers: ['mkfs.ext2'], sizeMiB: 16, mountable: true, make: (fs) => runOk('mkfs.ext2', ['-q', '-F', '-L', 'two', fs]) },
  { name: 'ext3', peers: ['mkfs.ext3'], sizeMiB: 16, mountable: true, make: (fs) => runOk('mkfs.ext3', ['-q', '-F', '-L', 'three', fs]) },
  { name: 'ext4', peers: ['mkfs.ext4'], sizeMiB: 32, mountable: true, make: (fs) => runOk('mkfs.ext4', ['-q', '-F', '-L', 'rootfs', fs]) },
  { name: 'ext4 without a journal', peers: ['mkfs.ext4'], sizeMiB: 16, mountable: true, make: (fs) => runOk('mkfs.ext4', ['-q', '-F', '-O', '^has_journal', fs]) },
  { name: 'ext2 with extents', peers: ['mkfs.ext2'], sizeMiB: 16, mountable: true, make: (fs) => runOk('mkfs.ext2', ['-q', '-F', '-O', 'extent', fs]) },
  { name: 'ext3 with 1 KiB blocks', peers: ['mkfs.ext3'], sizeMiB: 8, mountable: true, make: (fs) => runOk('mkfs.ext3', ['-q', '-F', '-b', '1024', fs]) },
  { name: 'xfs', peers: ['mkfs.xfs'], sizeMiB: 300, mountable: true, make: (fs) => runOk('mkfs.xfs', ['-q', '-L', 'xfsroot', fs]) },
  { name: 'btrfs', peers: ['mkfs.btrfs'], sizeMiB: 128, mountable: true, make: (fs) => runOk('mkfs.btrfs', ['-q', '-L', 'butter', fs]) },
  { name: 'vfat FAT12', peers: ['mkfs.vfat'], sizeMiB: 4, mountable: true, make: (fs) => runOk('mkfs.vfat', ['-F', '12', '-n', 'SMALL', fs]) },
  { name: 'vfat FAT16', peers: ['mkfs.vfat'], sizeMiB: 64, mountable: true, make: (fs) => runOk('mkfs.vfat', ['-F', '16', fs]) },
  { name: 'vfat FAT32', peers: ['mkfs.vfat'], sizeMiB: 64, mountable: true, make: (fs) => runOk('mkfs.vfat', ['-F', '32', '-n', 'EFI', fs]) },
  {
    name: 'vfat whose label entry was deleted (boot sector label stale)',
    peers: ['mkfs.vfat'],
    sizeMiB: 16,
    mountable: true,
    make: async (fs) => {
      await runOk('mkfs.vfat', ['-F', '16', '-n', 'STALE', fs]);
      // Root directory of FAT16: after the reserved sectors and the FATs (BPB at 0x0B..0x17).
      const fd = openSync(fs, 'r+');
      const bs = Buffer.alloc(512);
      readSync(fd, bs, 0, 512, 0);
      const root = (bs.readUInt16LE(0x0e) + bs[0x10] * bs.readUInt16LE(0x16)) * bs.readUInt16LE(0x0b);
      writeSync(fd, Buffer.from([0xe5]), 0, 1, root);
      closeSync(fd);
    },
  },
  { name: 'squashfs', peers: ['mksquashfs'], sizeMiB: 0, mountable: true, make: (fs, src) => runOk('mksquashfs', [src, fs, '-noappend', '-quiet', '-no-progress']) },
  { name: 'erofs', peers: ['mkfs.erofs'], sizeMiB: 0, mountable: true, make: (fs, src) => runOk('mkfs.erofs', ['--quiet', '-U', '11111111-2222-3333-4444-555555555555', fs, src]) },
  { name: 'swap', peers: ['mkswap'], sizeMiB: 16, mountable: false, make: (fs) => runOk('mkswap', ['-L', 'swp', fs]) },
  {
    name: 'LUKS2',
    peers: ['cryptsetup'],
    sizeMiB: 32,
    mountable: false,
    make: (fs) => runOk('cryptsetup', ['luksFormat', '--batch-mode', '--type', 'luks2', '--label', 'vault', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', fs, '-'], { input: passphrase }),
  },
  {
    name: 'LUKS1',
    peers: ['cryptsetup'],
    sizeMiB: 32,
    mountable: false,
    make: (fs) => runOk('cryptsetup', ['luksFormat', '--batch-mode', '--type', 'luks1', '--pbkdf-force-iterations', '1000', fs, '-'], { input: passphrase }),
  },
];

const MiB = 1024 * 1024;

async function compareWithBlkid(dev: BlockDevice, blkidArgs: readonly string[], mountable: boolean): Promise<void> {
  const theirs = parseExport(await runOk('blkid', ['-p', '-o', 'export', ...blkidArgs]));
  const ours = await probeFilesystem(dev);
  assert.ok(ours, `blkid says ${theirs.TYPE}, we found nothing`);
  assert.equal(ours.type, theirs.TYPE);
  assert.equal(ours.uuid, theirs.UUID);
  assert.equal(ours.label, theirs.LABEL);
  if (ours.type === 'vfat' || ours.type === 'crypto_LUKS' || ours.type === 'squashfs') assert.equal(ours.version, theirs.VERSION);
  if (mountable) {
    assert.deepEqual(await probeMountableFilesystem(dev, 'partition 2'), ours);
  } else {
    await assert.rejects(probeMountableFilesystem(dev, 'partition 2'), (e: unknown) => e instanceof UnsupportedImageError && /^partition 2 is (a swap area|a LUKS encrypted volume)/.test(e.message));
  }
}

for (const c of cases) {
  test(`${c.name}: detected like blkid, as a whole image and inside GPT partition 2`, async (t) => {
    if (!requirePeers(t, 'blkid', 'sfdisk', 'dd', ...c.peers)) return;
    const dir = tempDir(t);
    const src = join(dir, 'src');
    mkdirSync(join(src, 'etc'), { recursive: true });
    writeFileSync(join(src, 'etc', 'hostname'), 'imgbd\n');
    const fs = join(dir, 'fs.img');
    if (c.sizeMiB > 0) await runOk('truncate', ['-s', `${c.sizeMiB}M`, fs]);
    await c.make(fs, src);

    // Whole image: no partition table, the filesystem at byte 0.
    const whole = await openDevice(t, fs);
    assert.equal((await readPartitions(whole)).scheme, 'none');
    await compareWithBlkid(whole, [fs], c.mountable);

    // Inside partition 2 of a GPT disk, exported through the offset filter.
    const fsMiB = Math.ceil(statSync(fs).size / MiB);
    const disk = join(dir, 'disk.img');
    await runOk('truncate', ['-s', `${fsMiB + 8}M`, disk]);
    await runOk('sfdisk', ['-q', disk], { input: `label: gpt\nsize=2MiB, name="filler"\nsize=${fsMiB}MiB, name="data"\n` });
    const dev = await openDevice(t, disk);
    const { partition, device: part } = await openPartition(dev, { name: 'data' });
    assert.equal(partition.number, 2);
    assert.equal(part.sizeBytes, fsMiB * MiB);
    await runOk('dd', [`if=${fs}`, `of=${disk}`, 'bs=1M', `seek=${partition.startBytes}`, 'oflag=seek_bytes', 'conv=notrunc,sparse', 'status=none']);
    await compareWithBlkid(part, ['--offset', String(partition.startBytes), '--size', String(partition.sizeBytes), disk], c.mountable);

    // The filler partition is blank: nothing for us, nothing for blkid (exit 2: nothing found).
    const { partition: filler } = await findPartition(dev, 1);
    assert.equal(await probeFilesystem(offsetFilter(dev, { offsetBytes: filler.startBytes, sizeBytes: filler.sizeBytes })), null);
    const blank = await run('blkid', ['-p', '-o', 'export', '--offset', String(filler.startBytes), '--size', String(filler.sizeBytes), disk]);
    assert.equal(blank.code, 2, blank.stdout);
  });
}

test('ext4 in logical partition 6 of an MBR disk, found through the EBR chain', async (t) => {
  if (!requirePeers(t, 'blkid', 'sfdisk', 'dd', 'mkfs.ext4')) return;
  const dir = tempDir(t);
  const disk = join(dir, 'disk.img');
  await runOk('truncate', ['-s', '64M', disk]);
  const script = ['label: dos', 'size=4MiB, type=83', 'type=5', `${disk}5 : size=8MiB, type=82`, `${disk}6 : size=24MiB, type=83`, `${disk}7 : type=83`, ''].join('\n');
  await runOk('sfdisk', ['-q', disk], { input: script });
  const fs = join(dir, 'fs.img');
  await runOk('truncate', ['-s', '24M', fs]);
  await runOk('mkfs.ext4', ['-q', '-F', '-L', 'logical', fs]);
  const dev = await openDevice(t, disk);
  const { partition } = await findPartition(dev, 6);
  assert.equal(partition.sizeBytes, 24 * MiB);
  await runOk('dd', [`if=${fs}`, `of=${disk}`, 'bs=1M', `seek=${partition.startBytes}`, 'oflag=seek_bytes', 'conv=notrunc,sparse', 'status=none']);
  await compareWithBlkid(offsetFilter(dev, { offsetBytes: partition.startBytes, sizeBytes: partition.sizeBytes }), ['--offset', String(partition.startBytes), '--size', String(partition.sizeBytes), disk], true);
  // The EBR that describes partition 6 sits before it and was not overwritten by the copy.
  assert.deepEqual((await readPartitions(dev)).partitions.map((p) => p.number), [1, 2, 5, 6, 7]);
});
