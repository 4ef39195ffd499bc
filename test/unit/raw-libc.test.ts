// The libc bindings against a real sparse file: SEEK_DATA/SEEK_HOLE positions and their ENXIO
// end, fallocate modes seen through lseek, and failed calls turned into errors whose `code`
// is the errno name (and which toNbdErrno maps like Node's own fs errors).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, writeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import { toNbdErrno } from '../../src/errors.js';
import { isNotSupported, SyscallError } from '../../src/sys/errno.js';
import { adviseWillNeed, blockDeviceSize, fallocate, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, seekData, seekHole } from '../../src/sys/libc.js';
import { tempDir } from '../helpers/peers.js';

const MiB = 1 << 20;

function sparseFd(t: import('node:test').TestContext): { fd: number; path: string } {
  const path = join(tempDir(t), 'f');
  const fd = openSync(path, 'w+');
  t.after(() => closeSync(fd));
  ftruncateSync(fd, 4 * MiB);
  writeSync(fd, Buffer.alloc(64 * 1024, 0x5a), 0, 64 * 1024, 2 * MiB);
  return { fd, path };
}

test('SEEK_DATA / SEEK_HOLE find the written range; ENXIO past the last data is null', (t) => {
  const { fd } = sparseFd(t);
  assert.equal(seekData(fd, 0), 2 * MiB);
  assert.equal(seekData(fd, 2 * MiB + 100), 2 * MiB + 100);
  assert.equal(seekHole(fd, 2 * MiB), 2 * MiB + 64 * 1024);
  assert.equal(seekHole(fd, 0), 0);
  assert.equal(seekData(fd, 3 * MiB), null);
  assert.equal(seekHole(fd, 4 * MiB), null, 'at EOF there is nothing to find');
});

test('fallocate PUNCH_HOLE removes data, ZERO_RANGE zeroes it, size is kept', async (t) => {
  const { fd, path } = sparseFd(t);
  await fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 2 * MiB, 4096);
  assert.ok(readFileSync(path).subarray(2 * MiB, 2 * MiB + 4096).every((b) => b === 0));
  await fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * MiB, 64 * 1024);
  assert.equal(seekData(fd, 0), null);
  assert.equal(readFileSync(path).length, 4 * MiB);
});

test('failed calls carry the errno name as code and map to NBD errnos', async (t) => {
  const { fd } = sparseFd(t);
  // PUNCH_HOLE without KEEP_SIZE is refused by the kernel: EOPNOTSUPP.
  const e1 = await fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096).then(() => null, (e: unknown) => e);
  assert.ok(e1 instanceof SyscallError);
  assert.equal(e1.code, 'EOPNOTSUPP');
  assert.equal(e1.errno, 95);
  assert.ok(isNotSupported(e1));
  assert.equal(toNbdErrno(e1), 'ENOTSUP');
  const e2 = await fallocate(-1, 0, 0, 1).then(() => null, (e: unknown) => e);
  assert.ok(e2 instanceof SyscallError);
  assert.equal(e2.code, 'EBADF');
  assert.equal(toNbdErrno(e2), 'EIO');
  // A block-device ioctl on a regular file: ENOTTY.
  assert.throws(() => blockDeviceSize(fd), (e: unknown) => e instanceof SyscallError && e.code === 'ENOTTY');
  assert.throws(() => seekData(-1, 0), (e: unknown) => e instanceof SyscallError && e.code === 'EBADF');
  await assert.rejects(adviseWillNeed(-1, 0, 1), (e: unknown) => e instanceof SyscallError && e.code === 'EBADF');
  await adviseWillNeed(fd, 0, MiB);
});

test('many concurrent async calls are queued, not refused', async (t) => {
  const { fd } = sparseFd(t);
  await Promise.all(Array.from({ length: 600 }, (_, i) => fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (i % 64) * 4096, 4096)));
});
