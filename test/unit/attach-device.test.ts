// Device-choice and readiness logic of kernel attach against a fake /sys, /dev and /proc
// tree: free-device choice, partitions from sysfs, device nodes checked against sysfs (stale
// nodes refused), mountinfo parsing, mounts/holders/openers of a device.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import {
  chooseFreeDevice,
  deviceConnected,
  deviceHolders,
  deviceMounts,
  deviceOpeners,
  deviceSizeBytes,
  kernelPartitions,
  listNbdIndices,
  nbdMaxPart,
  nodeMatches,
  parseMountInfo,
  parseNbdName,
  type SysRoots,
} from '../../src/kernel/device.js';
import { processRunning } from '../../src/kernel/attach-list.js';
import { missingForReady, waitForDeviceReady } from '../../src/kernel/supervisor-ready.js';
import { tempDir } from '../helpers/peers.js';

function put(path: string, text: string): void {
  mkdirSync(join(path, '..'), { recursive: true });
  writeFileSync(path, text);
}

interface FakeDisk {
  readonly sectors: number;
  readonly pid?: boolean;
  readonly partitions?: ReadonlyArray<readonly [number, number]>;
}

function fakeTree(t: TestContext, disks: Record<number, FakeDisk>): SysRoots {
  const root = tempDir(t, 'imgbd-fake-sys-');
  const roots = { sys: join(root, 'sys'), dev: join(root, 'dev'), proc: join(root, 'proc') };
  mkdirSync(roots.dev, { recursive: true });
  put(join(roots.sys, 'module/nbd/parameters/max_part'), '15\n');
  for (const [i, d] of Object.entries(disks)) {
    const base = join(roots.sys, 'block', `nbd${i}`);
    put(join(base, 'size'), `${d.sectors}\n`);
    put(join(base, 'dev'), `43:${Number(i) * 16}\n`);
    mkdirSync(join(base, 'holders'), { recursive: true });
    if (d.pid) put(join(base, 'pid'), '123\n');
    for (const [n, sectors] of d.partitions ?? []) {
      put(join(base, `nbd${i}p${n}`, 'dev'), `43:${Number(i) * 16 + n}\n`);
      put(join(base, `nbd${i}p${n}`, 'size'), `${sectors}\n`);
    }
  }
  return roots;
}

test('nbd names: devices and partitions, nothing else', () => {
  assert.deepEqual(parseNbdName('nbd3'), { index: 3 });
  assert.deepEqual(parseNbdName('/dev/nbd12'), { index: 12 });
  assert.deepEqual(parseNbdName('/dev/nbd1p2'), { index: 1, partition: 2 });
  for (const bad of ['nbd', '/dev/sda', 'nbd1x', '/tmp/nbd1', 'nbd-1', '/dev/nbd1p']) assert.equal(parseNbdName(bad), null, bad);
});

test('the lowest device with no client and size 0 is chosen, skipping excluded ones', (t) => {
  const roots = fakeTree(t, { 0: { sectors: 2048, pid: true }, 1: { sectors: 0 }, 2: { sectors: 0 }, 10: { sectors: 0 }, 3: { sectors: 8, pid: false } });
  assert.deepEqual(listNbdIndices(roots), [0, 1, 2, 3, 10]);
  assert.equal(chooseFreeDevice(new Set(), roots), 1);
  assert.equal(chooseFreeDevice(new Set([1]), roots), 2);
  // nbd3 has a size but no pid: being configured by someone else.
  assert.equal(chooseFreeDevice(new Set([1, 2]), roots), 10);
  assert.equal(chooseFreeDevice(new Set([1, 2, 10]), roots), null);
  assert.equal(deviceConnected(0, roots), true);
  assert.equal(deviceSizeBytes(0, roots), 2048 * 512);
  assert.equal(deviceSizeBytes(7, roots), null);
  assert.equal(nbdMaxPart(roots), 15);
});

test('no nbd module: no devices, nothing to choose', (t) => {
  const roots = { sys: tempDir(t), dev: '/nonexistent', proc: '/nonexistent' };
  assert.deepEqual(listNbdIndices(roots), []);
  assert.equal(chooseFreeDevice(new Set(), roots), null);
  assert.equal(nbdMaxPart(roots), 0);
});

test('partitions come from sysfs with their device numbers and sizes', (t) => {
  const roots = fakeTree(t, { 2: { sectors: 4096, pid: true, partitions: [[3, 100], [1, 200], [10, 5]] } });
  assert.deepEqual(kernelPartitions(2, roots), [
    { number: 1, name: 'nbd2p1', devt: '43:33', sizeBytes: 200 * 512 },
    { number: 3, name: 'nbd2p3', devt: '43:35', sizeBytes: 100 * 512 },
    { number: 10, name: 'nbd2p10', devt: '43:42', sizeBytes: 5 * 512 },
  ]);
  assert.deepEqual(kernelPartitions(5, roots), []);
});

test('a device node counts only when it is a block node with the sysfs device number', (t) => {
  if (process.getuid?.() !== 0) {
    // CI runs as root: there this check must run, never skip.
    if (process.env.CI === 'true') throw new Error('this test needs root (mknod); CI runs as root');
    return t.skip('mknod needs root');
  }
  const roots = fakeTree(t, { 1: { sectors: 2048, pid: true, partitions: [[1, 1000], [2, 1000]] } });
  execFileSync('mknod', [join(roots.dev, 'nbd1p1'), 'b', '43', '17']);
  // A stale node from an earlier attach with a different numbering.
  execFileSync('mknod', [join(roots.dev, 'nbd1p2'), 'b', '43', '99']);
  writeFileSync(join(roots.dev, 'nbd1p3'), 'not a device');
  assert.equal(nodeMatches('nbd1p1', '43:17', roots), true);
  assert.equal(nodeMatches('nbd1p2', '43:18', roots), false);
  assert.equal(nodeMatches('nbd1p3', '43:19', roots), false);
  assert.equal(nodeMatches('nbd1p4', '43:20', roots), false);
  assert.equal(missingForReady({ index: 1, sizeBytes: 2048 * 512, partitions: [1], roots }), null);
  assert.match(missingForReady({ index: 1, sizeBytes: 2048 * 512, partitions: [1, 2], roots }) ?? '', /nbd1p2 missing or not 43:18/);
});

test('readiness waits for the published size and every partition', async (t) => {
  const roots = fakeTree(t, { 4: { sectors: 0, pid: true } });
  assert.match(missingForReady({ index: 4, sizeBytes: 1 << 20, partitions: [], roots }) ?? '', /size 0 bytes \(want 1048576\)/);
  assert.match(missingForReady({ index: 9, sizeBytes: 1 << 20, partitions: [], roots }) ?? '', /missing/);
  // Sizes that are not a whole number of sectors are published rounded down.
  put(join(roots.sys, 'block/nbd4/size'), '2048\n');
  assert.equal(missingForReady({ index: 4, sizeBytes: (1 << 20) + 100, partitions: [], roots }), null);
  assert.match(missingForReady({ index: 4, sizeBytes: 1 << 20, partitions: [1], roots }) ?? '', /partition 1 not in sysfs/);
  await assert.rejects(waitForDeviceReady({ index: 4, sizeBytes: 1 << 20, partitions: [1], roots, timeoutMs: 100, intervalMs: 10 }), {
    code: 'ERR_DEVICE_NOT_READY',
  });
  const later = setTimeout(() => put(join(roots.sys, 'block/nbd4/size'), '4096\n'), 50);
  t.after(() => clearTimeout(later));
  assert.deepEqual(await waitForDeviceReady({ index: 4, sizeBytes: 2 << 20, partitions: [], roots, timeoutMs: 5000, intervalMs: 10 }), []);
});

test('mountinfo: fields, octal escapes, optional fields', () => {
  const text = [
    '36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue',
    '100 29 43:1 / /tmp/with\\040space rw,relatime shared:7 master:2 - ext4 /dev/nbd0p1 rw',
    '101 29 43:16 / /mnt/x rw - xfs /dev/nbd1 rw,attr2',
    'garbage line',
    '',
  ].join('\n');
  assert.deepEqual(parseMountInfo(text), [
    { mountId: 36, devt: '98:0', mountPoint: '/mnt2', fstype: 'ext3', source: '/dev/root' },
    { mountId: 100, devt: '43:1', mountPoint: '/tmp/with space', fstype: 'ext4', source: '/dev/nbd0p1' },
    { mountId: 101, devt: '43:16', mountPoint: '/mnt/x', fstype: 'xfs', source: '/dev/nbd1' },
  ]);
});

test('mounts, holders and openers of a device include its partitions', (t) => {
  const roots = fakeTree(t, { 0: { sectors: 2048, pid: true, partitions: [[1, 1000]] }, 1: { sectors: 2048, pid: true } });
  const mounts = parseMountInfo('1 0 43:1 / /a rw - ext4 /dev/nbd0p1 rw\n2 0 43:16 / /b rw - ext4 /dev/nbd1 rw\n3 0 43:0 / /c rw - ext4 /dev/nbd0 rw\n');
  assert.deepEqual(deviceMounts(0, roots, mounts).map((m) => m.mountPoint), ['/a', '/c']);
  assert.deepEqual(deviceMounts(1, roots, mounts).map((m) => m.mountPoint), ['/b']);
  mkdirSync(join(roots.sys, 'block/nbd0/nbd0p1/holders/dm-3'), { recursive: true });
  assert.deepEqual(deviceHolders(0, roots), ['dm-3']);
  assert.deepEqual(deviceHolders(1, roots), []);
  mkdirSync(join(roots.proc, '77/fd'), { recursive: true });
  symlinkSync('/dev/nbd0p1', join(roots.proc, '77/fd/4'));
  symlinkSync('/dev/null', join(roots.proc, '77/fd/0'));
  mkdirSync(join(roots.proc, '78/fd'), { recursive: true });
  symlinkSync('/dev/nbd1', join(roots.proc, '78/fd/3'));
  assert.deepEqual(deviceOpeners(0, roots), [{ pid: 77, path: '/dev/nbd0p1' }]);
  assert.deepEqual(deviceOpeners(1, roots), [{ pid: 78, path: '/dev/nbd1' }]);
});

test('a process counts as running until it is a zombie or gone; names with ") " do not confuse it', (t) => {
  const proc = tempDir(t);
  const roots = { sys: '/nonexistent', dev: '/nonexistent', proc };
  const stat = (pid: number, text: string) => put(join(proc, String(pid), 'stat'), text);
  stat(10, '10 (node) S 1 10 10 0 -1');
  stat(11, '11 (odd) R name) Z 1 11 11 0 -1');
  stat(12, '12 (node) Z 1 12 12 0 -1');
  stat(13, '13 (node) X 1 13 13 0 -1');
  assert.equal(processRunning(10, roots), true);
  assert.equal(processRunning(11, roots), false);
  assert.equal(processRunning(12, roots), false);
  assert.equal(processRunning(13, roots), false);
  assert.equal(processRunning(14, roots), false);
  assert.equal(processRunning(process.pid), true);
});
