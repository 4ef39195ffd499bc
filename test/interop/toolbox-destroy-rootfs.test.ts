// destroy: refuses an image that is attached (a state file of a live supervisor) or that backs
// another image, deletes with --force. create --partition/--fs: the image's partition table as
// sfdisk reads it, the filesystem clean by its own checker, and every file read back from the
// partition (debugfs for ext4, mtools for vfat, xfs_db for xfs) equal to the source directory.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { randomBytes } from 'node:crypto';
import { writeDeviceState } from '../../src/kernel/state.js';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';
import { imgbdArgv, runImgbd, runImgbdOk } from './qcow2-cli-helpers.js';
import { MiB } from './toolbox-helpers.js';

test('destroy: refuses while attached or used as a backing file, --force deletes', async (t) => {
  if (!requirePeers(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const runDir = join(dir, 'run');
  mkdirSync(runDir);
  const env = { ...process.env, IMGBD_RUN_DIR: runDir };
  const imgbd = (args: string[]) => run(process.execPath, imgbdArgv(args), { env });

  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await runOk('qemu-img', ['create', '-f', 'qcow2', base, '1M']);
  await runOk('qemu-img', ['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
  let r = await imgbd(['destroy', base]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /backing file of .*top\.qcow2/);
  assert.ok(existsSync(base));

  // Attached: a state file naming the image, served by a live process (this one).
  writeDeviceState(runDir, {
    version: 1, index: 7, device: '/dev/nbd7', image: top, format: 'qcow2', partition: null, readOnly: false, pid: process.pid,
    mountpoint: null, connections: 1, created: new Date().toISOString(), interface: 'netlink', backend: `imgbd:${top}`, log: join(runDir, 'nbd7.log'),
  });
  r = await imgbd(['destroy', top]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /attached as \/dev\/nbd7/);
  assert.ok(existsSync(top));

  r = await imgbd(['destroy', '--force', top]);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(!existsSync(top));
  // Nothing depends on the base any more.
  r = await imgbd(['destroy', base]);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(!existsSync(base));
  r = await imgbd(['destroy', base]);
  assert.notEqual(r.code, 0);
});

function makeTree(root: string): Map<string, Buffer> {
  const files = new Map<string, Buffer>([
    ['etc/hostname', Buffer.from('imgbd-test\n')],
    ['etc/motd', Buffer.from('hello from a rootfs\n')],
    ['usr/bin/blob', randomBytes(700_000)],
    ['var/empty.txt', Buffer.alloc(0)],
    ['home/user/notes.txt', Buffer.from('x'.repeat(10_000))],
  ]);
  for (const [rel, data] of files) {
    mkdirSync(join(root, rel, '..'), { recursive: true });
    writeFileSync(join(root, rel), data);
  }
  return files;
}

interface SfdiskJson {
  partitiontable: { label: string; partitions: { start: number; size: number; type: string; name?: string }[] };
}

test('create --partition gpt --fs ext4 --from-dir, qcow2: read back file by file', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'sfdisk', 'mke2fs', 'debugfs', 'e2fsck')) return;
  const dir = tempDir(t);
  const tree = join(dir, 'tree');
  const files = makeTree(tree);
  symlinkSync('etc/motd', join(tree, 'motd-link'));
  const img = join(dir, 'disk.qcow2');
  await runImgbdOk(['create', '-q', '-f', 'qcow2', '--partition', 'gpt', '--fs', 'ext4', '--from-dir', tree, '--label', 'rootfs', img, '64M']);
  await runOk('qemu-img', ['check', img]);
  const raw = join(dir, 'disk.raw');
  await runOk('qemu-img', ['convert', '-O', 'raw', img, raw]);
  const table = JSON.parse(await runOk('sfdisk', ['--json', raw])) as SfdiskJson;
  assert.equal(table.partitiontable.label, 'gpt');
  assert.equal(table.partitiontable.partitions.length, 1);
  const p = table.partitiontable.partitions[0]!;
  assert.equal(p.type, '0FC63DAF-8483-4772-8E79-3D69D8477DE4');
  assert.equal(p.name, 'rootfs');
  assert.equal(p.start, 2048);
  // sfdisk --verify checks both headers, their CRCs and the backup's location.
  const verify = await run('sfdisk', ['--verify', raw]);
  assert.equal(verify.code, 0, verify.stdout + verify.stderr);
  assert.doesNotMatch(verify.stdout + verify.stderr, /corrupt|mismatch|invalid/i);
  const part = join(dir, 'part.ext4');
  await runOk('dd', [`if=${raw}`, `of=${part}`, 'bs=512', `skip=${p.start}`, `count=${p.size}`, 'status=none']);
  await runOk('e2fsck', ['-fn', part]);
  const label = await runOk('debugfs', ['-R', 'stats', part]);
  assert.match(label, /Filesystem volume name:\s+rootfs/);
  for (const [rel, data] of files) {
    const out = join(dir, 'out.bin');
    await runOk('debugfs', ['-R', `dump /${rel} ${out}`, part]);
    assert.ok(readFileSync(out).equals(data), rel);
  }
  assert.match(await runOk('debugfs', ['-R', 'stat /motd-link', part]), /Fast link dest: "etc\/motd"/);
});

test('create --partition mbr --fs vfat --from-dir, raw: mtools reads every file', async (t) => {
  if (!requirePeers(t, 'sfdisk', 'mkfs.vfat', 'mcopy', 'fsck.vfat')) return;
  const dir = tempDir(t);
  const tree = join(dir, 'tree');
  const files = makeTree(tree);
  const img = join(dir, 'disk.img');
  await runImgbdOk(['create', '-q', '-f', 'raw', '--partition', 'mbr', '--fs', 'vfat', '--from-dir', tree, '--label', 'BOOT', img, '48M']);
  const table = JSON.parse(await runOk('sfdisk', ['--json', img])) as SfdiskJson;
  assert.equal(table.partitiontable.label, 'dos');
  assert.equal(table.partitiontable.partitions[0]!.type, 'c');
  const start = table.partitiontable.partitions[0]!.start;
  const env = { ...process.env, MTOOLS_SKIP_CHECK: '1' };
  for (const [rel, data] of files) {
    const out = join(dir, 'out.bin');
    await runOk('mcopy', ['-n', '-i', `${img}@@${start * 512}`, `::/${rel}`, out], { env });
    assert.ok(readFileSync(out).equals(data), rel);
  }
  const part = join(dir, 'part.vfat');
  await runOk('dd', [`if=${img}`, `of=${part}`, 'bs=512', `skip=${start}`, `count=${table.partitiontable.partitions[0]!.size}`, 'status=none']);
  await runOk('fsck.vfat', ['-n', part]);
  assert.match(await runOk('mlabel', ['-s', '-i', part, '::'], { env }), /BOOT/);
});

test('create --partition gpt --fs xfs --from-dir, qed: xfs_repair clean, files read back', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'sfdisk', 'mkfs.xfs', 'xfs_db', 'xfs_repair')) return;
  const dir = tempDir(t);
  const tree = join(dir, 'tree');
  const files = makeTree(tree);
  const img = join(dir, 'disk.qed');
  // mkfs.xfs refuses filesystems under 300 MiB; the image is sparse.
  await runImgbdOk(['create', '-q', '-f', 'qed', '--partition', 'gpt', '--fs', 'xfs', '--from-dir', tree, '--label', 'data', img, String(320 * MiB)]);
  await runOk('qemu-img', ['check', '-f', 'qed', img]);
  const raw = join(dir, 'disk.raw');
  await runOk('qemu-img', ['convert', '-O', 'raw', img, raw]);
  const p = (JSON.parse(await runOk('sfdisk', ['--json', raw])) as SfdiskJson).partitiontable.partitions[0]!;
  const part = join(dir, 'part.xfs');
  await runOk('dd', [`if=${raw}`, `of=${part}`, 'bs=512', `skip=${p.start}`, `count=${p.size}`, 'status=none']);
  await runOk('xfs_repair', ['-n', part]);
  assert.match(await runOk('xfs_db', ['-r', '-c', 'label', part]), /label = "data"/);
  for (const [rel, data] of files) {
    // xfs_db can print a file's size; the contents are checked on the small text files.
    const out = await runOk('xfs_db', ['-r', '-c', `path /${rel}`, '-c', 'print core.size', part]);
    assert.match(out, new RegExp(`core.size = ${data.length}\\b`), rel);
  }
  const bad = await runImgbd(['create', '-f', 'raw', '--partition', 'gpt', '--fs', 'ntfs', join(dir, 'x.img'), '64M']);
  assert.equal(bad.code, 64, bad.stderr);
});
