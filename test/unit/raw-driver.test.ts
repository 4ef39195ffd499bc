// The raw driver against real sparse files (and a loop device when the host allows one):
// extents are compared with the layout the test wrote, trims and zeroes are read back, and
// the "probed raw" rule refuses writes that would change the probed format.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../src/block/device.js';
import { RequestError } from '../../src/errors.js';
import { openRaw } from '../../src/formats/raw/driver.js';
import { seekExtents } from '../../src/formats/raw/extents.js';
import { tempDir } from '../helpers/peers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const HOLE = EXTENT_HOLE | EXTENT_ZERO;

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed) & 0xff || 1;
  return b;
}

/** An 8 MiB sparse file with data at [1 MiB, +64 KiB) and [4 MiB, 5 MiB). */
function makeSparse(t: TestContext): string {
  const path = join(tempDir(t), 'disk.raw');
  const fd = openSync(path, 'w+');
  try {
    ftruncateSync(fd, 8 * MiB);
    writeSync(fd, pattern(64 * KiB, 1), 0, 64 * KiB, 1 * MiB);
    writeSync(fd, pattern(1 * MiB, 2), 0, 1 * MiB, 4 * MiB);
  } finally {
    closeSync(fd);
  }
  return path;
}

async function readAt(path: string, offset: number, length: number): Promise<Buffer> {
  const dev = await openRaw(path, { readOnly: true });
  try {
    const b = Buffer.alloc(length);
    await dev.pread(b, offset);
    return b;
  } finally {
    await dev.close();
  }
}

test('size, capabilities and block sizes of a regular file', async (t) => {
  const dev = await openRaw(makeSparse(t));
  t.after(() => dev.close());
  assert.equal(dev.sizeBytes, 8 * MiB);
  const c = dev.capabilities();
  assert.equal(c.writable, true);
  assert.equal(c.flush, true);
  assert.equal(c.fua, false, 'FUA is emulated by the backend with flush');
  assert.equal(c.trim, true);
  assert.equal(c.extents, true);
  assert.equal(c.multiConn, true);
  assert.equal(dev.blockSizes().minimum, 1);
});

test('read-only open: not writable, and the file refuses writes', async (t) => {
  const dev = await openRaw(makeSparse(t), { readOnly: true });
  t.after(() => dev.close());
  assert.equal(dev.capabilities().writable, false);
  await assert.rejects(dev.pwrite(Buffer.alloc(1), 0), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM');
});

test('pread returns what was written, pwrite + flush lands in the file', async (t) => {
  const path = makeSparse(t);
  const dev = await openRaw(path);
  const got = Buffer.alloc(64 * KiB);
  await dev.pread(got, 1 * MiB);
  assert.deepEqual(got, pattern(64 * KiB, 1));
  const data = pattern(10_000, 9);
  await dev.pwrite(data, 12_345);
  await dev.flush();
  await dev.close();
  assert.deepEqual(readFileSync(path).subarray(12_345, 22_345), data);
});

test('extents report the holes and data the file was built with', async (t) => {
  const dev = await openRaw(makeSparse(t), { readOnly: true });
  t.after(() => dev.close());
  assert.deepEqual(await dev.extents(0, 8 * MiB), [
    { length: 1 * MiB, flags: HOLE },
    { length: 64 * KiB, flags: 0 },
    { length: 3 * MiB - 64 * KiB, flags: HOLE },
    { length: 1 * MiB, flags: 0 },
    { length: 3 * MiB, flags: HOLE },
  ]);
  // A window starting inside a hole and ending inside data is clipped on both sides.
  assert.deepEqual(await dev.extents(512 * KiB, 4 * MiB), [
    { length: 512 * KiB, flags: HOLE },
    { length: 64 * KiB, flags: 0 },
    { length: 3 * MiB - 64 * KiB, flags: HOLE },
    { length: 512 * KiB, flags: 0 },
  ]);
  assert.deepEqual(await dev.extents(0, 8 * MiB, { one: true }), [{ length: 1 * MiB, flags: HOLE }]);
  assert.deepEqual(await dev.extents(4 * MiB + 7, 100, { one: true }), [{ length: 100, flags: 0 }]);
});

test('the extent walk stops at its bound and every step makes progress', (t) => {
  const path = makeSparse(t);
  const fd = openSync(path, 'r');
  t.after(() => closeSync(fd));
  const two = seekExtents(fd, 0, 8 * MiB, false, 2);
  assert.deepEqual(two, [
    { length: 1 * MiB, flags: HOLE },
    { length: 64 * KiB, flags: 0 },
  ]);
  // Past end of file: all hole, in one step.
  assert.deepEqual(seekExtents(fd, 8 * MiB, 1 * MiB, false), [{ length: 1 * MiB, flags: HOLE }]);
});

test('trim punches a hole that reads back as zeros', async (t) => {
  const path = makeSparse(t);
  const dev = await openRaw(path);
  t.after(() => dev.close());
  await dev.trim(4 * MiB, 512 * KiB);
  const got = Buffer.alloc(1 * MiB);
  await dev.pread(got, 4 * MiB);
  assert.ok(got.subarray(0, 512 * KiB).every((b) => b === 0));
  assert.deepEqual(got.subarray(512 * KiB), pattern(1 * MiB, 2).subarray(512 * KiB));
  assert.deepEqual(await dev.extents(4 * MiB, 1 * MiB), [
    { length: 512 * KiB, flags: HOLE },
    { length: 512 * KiB, flags: 0 },
  ]);
});

test('zero with mayTrim deallocates; without it (NO_HOLE) the blocks stay allocated', async (t) => {
  const path = makeSparse(t);
  const dev = await openRaw(path);
  t.after(() => dev.close());
  const blocksBefore = statSync(path).blocks;
  await dev.zero(4 * MiB, 512 * KiB, { mayTrim: false });
  assert.equal(statSync(path).blocks, blocksBefore, 'NO_HOLE zeroing keeps the space allocated');
  await dev.zero(4 * MiB + 512 * KiB, 512 * KiB, { mayTrim: true });
  assert.ok(statSync(path).blocks < blocksBefore, 'zeroing with mayTrim gives space back');
  const got = Buffer.alloc(1 * MiB + 1);
  await dev.pread(got, 4 * MiB);
  assert.ok(got.subarray(0, 1 * MiB).every((b) => b === 0));
});

test('unaligned zero leaves its neighbours intact', async (t) => {
  const path = makeSparse(t);
  const dev = await openRaw(path);
  t.after(() => dev.close());
  await dev.zero(4 * MiB + 100, 5000, { mayTrim: true });
  await dev.zero(4 * MiB + 9000, 3, { mayTrim: false });
  await dev.close();
  const expect = pattern(1 * MiB, 2);
  expect.fill(0, 100, 5100);
  expect.fill(0, 9000, 9003);
  assert.deepEqual(await readAt(path, 4 * MiB, 1 * MiB), expect);
});

test('on a filesystem without ZERO_RANGE (tmpfs): fast NO_HOLE zero is ENOTSUP and changes nothing, slow falls back', async (t) => {
  if (!existsSync('/dev/shm')) {
    t.skip('no /dev/shm');
    return;
  }
  const dir = mkdtempSync('/dev/shm/imgbd-raw-');
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'disk.raw');
  const fd = openSync(path, 'w+');
  writeSync(fd, pattern(256 * KiB, 5), 0, 256 * KiB, 0);
  closeSync(fd);
  const dev = await openRaw(path);
  t.after(() => dev.close());
  // tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE; confirm that premise first.
  let zeroRangeMissing = false;
  try {
    await dev.zero(0, 4096, { mayTrim: false, fast: true });
  } catch (e) {
    zeroRangeMissing = e instanceof RequestError && e.errno === 'ENOTSUP';
    if (!zeroRangeMissing) throw e;
  }
  if (!zeroRangeMissing) {
    t.skip('this tmpfs supports ZERO_RANGE');
    return;
  }
  const got = Buffer.alloc(256 * KiB);
  await dev.pread(got, 0);
  assert.deepEqual(got, pattern(256 * KiB, 5), 'a failed fast zero alters nothing');
  await dev.zero(0, 4096, { mayTrim: false });
  await dev.zero(65536, 4096, { mayTrim: true, fast: true });
  await dev.pread(got, 0);
  const expect = pattern(256 * KiB, 5);
  expect.fill(0, 0, 4096);
  expect.fill(0, 65536, 65536 + 4096);
  assert.deepEqual(got, expect);
});

const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);

test('probed raw: 512-byte alignment, and writes that would change the probed format get EPERM', async (t) => {
  const path = makeSparse(t);
  const dev = await openRaw(path, { probedRaw: true });
  t.after(() => dev.close());
  assert.equal(dev.blockSizes().minimum, 512);
  const sector = Buffer.alloc(512);
  QCOW2_MAGIC.copy(sector, 0);
  await assert.rejects(dev.pwrite(sector, 0), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM' && /qcow2/.test(e.message));
  const qed = Buffer.alloc(4096);
  qed.write('QED\0', 0, 'latin1');
  await assert.rejects(dev.pwrite(qed, 0), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM');
  // A short write that completes a VDI signature at 0x40 is caught by merging with the head.
  await assert.rejects(dev.pwrite(Buffer.from([0x7f, 0x10, 0xda, 0xbe]), 0x40), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM');
  const head = Buffer.alloc(512);
  await dev.pread(head, 0);
  assert.ok(head.every((b) => b === 0), 'refused writes left the head untouched');
  // Ordinary data and the same magic past the probe head are fine.
  await dev.pwrite(pattern(512, 3), 0);
  await dev.pwrite(sector, 512);
  await dev.pread(head, 0);
  assert.deepEqual(head, pattern(512, 3));
});

test('raw opened with an explicit format may be given any header', async (t) => {
  const path = makeSparse(t);
  const dev = await openRaw(path, { probedRaw: false });
  await dev.pwrite(QCOW2_MAGIC, 0);
  await dev.close();
  assert.deepEqual(readFileSync(path).subarray(0, 8), QCOW2_MAGIC);
});

function tryLoop(path: string): string | null {
  if (process.getuid?.() !== 0) return null;
  try {
    return execFileSync('losetup', ['--find', '--show', path], { encoding: 'utf8' }).trim();
  } catch {
    return null;
  }
}

test('block device (loop): size by BLKGETSIZE64, BLKZEROOUT, BLKDISCARD', async (t) => {
  const path = makeSparse(t);
  const loop = tryLoop(path);
  if (!loop) {
    t.skip('cannot attach a loop device here (needs root and losetup)');
    return;
  }
  t.after(() => execFileSync('losetup', ['-d', loop]));
  const dev = await openRaw(loop);
  t.after(() => dev.close());
  assert.equal(dev.sizeBytes, 8 * MiB);
  assert.equal(dev.capabilities().extents, false);
  const sysRotational = readFileSync(`/sys/block/${loop.replace('/dev/', '')}/queue/rotational`, 'latin1').trim();
  assert.equal(dev.capabilities().rotational, sysRotational === '1');
  const got = Buffer.alloc(64 * KiB);
  await dev.pread(got, 1 * MiB);
  assert.deepEqual(got, pattern(64 * KiB, 1));
  await dev.zero(1 * MiB, 32 * KiB, { mayTrim: false });
  await dev.zero(1 * MiB + 32 * KiB, 100, { mayTrim: true });
  await dev.trim(4 * MiB, 1 * MiB);
  await dev.flush();
  await dev.pread(got, 1 * MiB);
  const expect = pattern(64 * KiB, 1);
  expect.fill(0, 0, 32 * KiB + 100);
  assert.deepEqual(got, expect);
});

test('probed raw: zeroing inside the head cannot complete a magic ending in a zero byte', async (t) => {
  const path = join(tempDir(t), 'disk.raw');
  writeFileSyncHead(path, Buffer.from('QED\x01', 'latin1'));
  const dev = await openRaw(path, { probedRaw: true });
  t.after(() => dev.close());
  await assert.rejects(dev.zero(3, 1), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM');
  await assert.rejects(dev.trim(3, 1), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM');
  const head = Buffer.alloc(4);
  await dev.pread(head, 0);
  assert.equal(head.toString('latin1'), 'QED\x01');
  await dev.zero(0, 512);
  await dev.pread(head, 0);
  assert.deepEqual(head, Buffer.alloc(4));
});

function writeFileSyncHead(path: string, head: Buffer): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, 64 * KiB);
    writeSync(fd, head, 0, head.length, 0);
  } finally {
    closeSync(fd);
  }
}
