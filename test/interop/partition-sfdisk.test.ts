// Partition tables written by sfdisk (util-linux), read by us, compared with what sfdisk
// --json, partx and blkid report for the same image.

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { DEFAULT_BLOCK_SIZES, type BlockDevice } from '../../src/block/device.js';
import { HostFile } from '../../src/io/host-file.js';
import { findPartition, readPartitions, type Partition } from '../../src/partition/table.js';
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

interface SfdiskPart {
  node: string;
  start: number;
  size: number;
  type: string;
  uuid?: string;
  name?: string;
  attrs?: string;
  bootable?: boolean;
}

interface SfdiskTable {
  label: string;
  id: string;
  sectorsize: number;
  partitions: SfdiskPart[];
}

async function sfdiskJson(path: string): Promise<SfdiskTable> {
  return (JSON.parse(await runOk('sfdisk', ['--json', path])) as { partitiontable: SfdiskTable }).partitiontable;
}

async function makeImage(t: TestContext, script: string, sizeMiB = 64): Promise<string> {
  const path = join(tempDir(t), 'disk.img');
  await runOk('truncate', ['-s', `${sizeMiB}M`, path]);
  // Device names in the script ("disk.img5 : ...") pin partition numbers; sfdisk resolves them relative to the image.
  await runOk('sfdisk', ['-q', path], { input: script.replaceAll('@', path) });
  return path;
}

/** sfdisk's GPT attribute names → bits (libfdisk gpt.c). */
function gptAttrBits(attrs: string | undefined): bigint {
  let bits = 0n;
  for (const word of (attrs ?? '').split(/\s+/).filter(Boolean)) {
    if (word === 'RequiredPartition') bits |= 1n;
    else if (word === 'NoBlockIOProtocol') bits |= 2n;
    else if (word === 'LegacyBIOSBootable') bits |= 4n;
    else if (word.startsWith('GUID:')) for (const n of word.slice(5).split(',')) bits |= 1n << BigInt(n);
    else throw new Error(`unknown sfdisk attribute ${word}`);
  }
  return bits;
}

function numberOf(node: string, path: string): number {
  assert.ok(node.startsWith(path));
  return Number(node.slice(path.length));
}

test('MBR with an empty slot, an extended partition and three logical partitions matches sfdisk and partx', async (t) => {
  if (!requirePeers(t, 'sfdisk', 'partx', 'blkid')) return;
  const path = await makeImage(
    t,
    [
      'label: dos',
      'label-id: 0x1234abcd',
      '@1 : start=2048, size=8MiB, type=83, bootable',
      '@3 : size=40MiB, type=5',
      '@5 : size=8MiB, type=83',
      '@6 : size=8MiB, type=8e',
      '@7 : type=b',
      '@4 : type=82',
      '',
    ].join('\n'),
  );
  const dev = await openDevice(t, path);
  const ours = await readPartitions(dev);
  const theirs = await sfdiskJson(path);
  assert.equal(ours.scheme, 'mbr');
  assert.equal(theirs.label, 'dos');
  assert.equal(ours.diskId, theirs.id);
  assert.deepEqual(ours.warnings, []);
  const key = (p: { number: number }) => p.number;
  assert.deepEqual(
    [...ours.partitions].sort((a, b) => key(a) - key(b)).map((p) => [p.number, p.startBytes, p.sizeBytes, p.type, p.bootable]),
    theirs.partitions
      .map((p) => ({ ...p, number: numberOf(p.node, path) }))
      .sort((a, b) => key(a) - key(b))
      .map((p) => [p.number, p.start * theirs.sectorsize, p.size * theirs.sectorsize, parseInt(p.type, 16).toString(16).padStart(2, '0'), p.bootable ?? false]),
  );
  assert.deepEqual(ours.partitions.filter((p) => p.number >= 5).map((p) => p.number), [5, 6, 7]);
  assert.deepEqual(ours.partitions.filter((p) => p.extended).map((p) => p.number), [3]);

  // partx prints the PARTUUID the kernel would give each partition.
  const partx = (await runOk('partx', ['--raw', '--noheadings', '-o', 'NR,START,SECTORS,UUID', path])).trim().split('\n');
  for (const line of partx) {
    const [nr, start, sectors, uuid] = line.split(' ');
    const p = ours.partitions.find((q) => q.number === Number(nr));
    assert.ok(p, `partition ${nr} found by partx is ours too`);
    assert.equal(p.startBytes, Number(start) * 512);
    if (!p.extended) assert.equal(p.sizeBytes, Number(sectors) * 512);
    assert.equal(p.uuid, uuid);
  }
  assert.equal(partx.length, ours.partitions.length);

  const blkid = await runOk('blkid', ['-p', '-o', 'export', path]);
  assert.match(blkid, /^PTTYPE=dos$/m);
  assert.match(blkid, new RegExp(`^PTUUID=${ours.diskId!.slice(2)}$`, 'm'));
  assert.equal((await findPartition(dev, 6)).partition.type, '8e');
});

const GPT_SCRIPT = [
  'label: gpt',
  'label-id: 01234567-89AB-CDEF-0011-223344556677',
  '@1 : size=4MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system", attrs="RequiredPartition"',
  '@3 : size=8MiB, name="root", attrs="LegacyBIOSBootable GUID:60", uuid=AAAAAAAA-0000-4000-8000-000000000003',
  '@4 : size=8MiB, name="dätä ✓"',
  '@7 : name="rest", type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F',
  '',
].join('\n');

async function compareGpt(path: string, dev: BlockDevice): Promise<Partition[]> {
  const ours = await readPartitions(dev);
  const theirs = await sfdiskJson(path);
  assert.equal(ours.scheme, 'gpt');
  assert.equal(theirs.label, 'gpt');
  assert.equal(ours.diskId, theirs.id.toLowerCase());
  assert.deepEqual(
    ours.partitions.map((p) => [p.number, p.startBytes, p.sizeBytes, p.type, p.uuid, p.name, p.attributes]),
    theirs.partitions
      .map((p) => [numberOf(p.node, path), p.start * 512, p.size * 512, p.type.toLowerCase(), p.uuid!.toLowerCase(), p.name ?? '', gptAttrBits(p.attrs)] as const)
      .sort((a, b) => a[0] - b[0]),
  );
  return [...ours.partitions];
}

test('GPT with named partitions, gaps in numbering and attributes matches sfdisk', async (t) => {
  if (!requirePeers(t, 'sfdisk', 'blkid')) return;
  const path = await makeImage(t, GPT_SCRIPT);
  const dev = await openDevice(t, path);
  const parts = await compareGpt(path, dev);
  assert.deepEqual(parts.map((p) => p.number), [1, 3, 4, 7]);
  assert.equal((await findPartition(dev, { name: 'dätä ✓' })).partition.number, 4);
  assert.equal((await findPartition(dev, { name: 'root' })).partition.bootable, true);
  await assert.rejects(findPartition(dev, { name: 'home' }), /no partition named "home".*1 name="EFI system"/);
  const blkid = await runOk('blkid', ['-p', '-o', 'export', path]);
  assert.match(blkid, /^PTTYPE=gpt$/m);
  assert.match(blkid, /^PTUUID=01234567-89ab-cdef-0011-223344556677$/m);
});

test('GPT with a corrupt primary header: we use the backup (and say so), as sfdisk does', async (t) => {
  if (!requirePeers(t, 'sfdisk')) return;
  const path = await makeImage(t, GPT_SCRIPT);
  const f = await HostFile.open(path);
  await f.pwrite(Buffer.from([0x00, 0x11]), 512 + 0x28); // FirstUsableLBA: header CRC no longer matches
  await f.close();
  const dev = await openDevice(t, path);
  await compareGpt(path, dev);
  const { warnings } = await readPartitions(dev);
  assert.match(warnings.join('\n'), /primary GPT header at LBA 1 is invalid \(header CRC32 mismatch.*using the backup at LBA 131071/);
});

test('a whole-disk FAT filesystem (mkfs.vfat, no table) is not mistaken for an MBR', async (t) => {
  if (!requirePeers(t, 'mkfs.vfat', 'blkid')) return;
  const path = join(tempDir(t), 'floppy.img');
  await runOk('truncate', ['-s', '32M', path]);
  await runOk('mkfs.vfat', [path]);
  const blkid = await runOk('blkid', ['-p', '-o', 'export', path]);
  assert.doesNotMatch(blkid, /PTTYPE/);
  assert.equal((await readPartitions(await openDevice(t, path))).scheme, 'none');
});

test('a GPT disk grown after partitioning (backup header no longer at the end) reads with a warning, like sfdisk', async (t) => {
  if (!requirePeers(t, 'sfdisk')) return;
  const path = await makeImage(t, GPT_SCRIPT);
  await runOk('truncate', ['-s', '+16M', path]);
  const dev = await openDevice(t, path);
  await compareGpt(path, dev);
  const { warnings } = await readPartitions(dev);
  assert.deepEqual(warnings, ['the backup GPT header is at LBA 131071, not at the last LBA 163839']);
});

test('a GPT disk truncated after partitioning has no valid header left', async (t) => {
  if (!requirePeers(t, 'sfdisk')) return;
  const path = await makeImage(t, GPT_SCRIPT);
  await runOk('truncate', ['-s', '32M', path]);
  const sfdisk = await run('sfdisk', ['--json', path]);
  assert.doesNotMatch(sfdisk.stdout, /"label": "gpt"/);
  await assert.rejects(readPartitions(await openDevice(t, path)), /GPT: no valid header: primary \(LBA 1\): usable LBAs 2048\.\.131038 do not fit a 65536-sector device/);
});
