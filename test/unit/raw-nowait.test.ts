import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Backend } from '../../src/block/backend.js';
import { offsetFilter } from '../../src/block/filters/offset.js';
import { openRaw } from '../../src/formats/raw/driver.js';
import { TMPFS_MAGIC } from '../../src/sys/fs-magic.js';
import { NowaitReader, tryPreadNowait } from '../../src/sys/nowait.js';
import { tempDir } from '../helpers/peers.js';

test('readNow serves page-cached data synchronously, exactly as pread does', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'disk.raw');
  const data = randomBytes(1 << 20);
  writeFileSync(path, data); // just written: in the page cache
  const raw = await openRaw(path, { readOnly: true });
  t.after(() => raw.close());
  const dev = new Backend(raw);
  for (const [offset, length] of [[0, 4096], [12345, 1], [(1 << 20) - 7, 7], [4096, 65536]] as const) {
    const buf = Buffer.alloc(length, 0xaa);
    assert.equal(dev.readNow(buf, offset), true, `readNow(${offset}, ${length})`);
    assert.deepEqual(buf, data.subarray(offset, offset + length));
  }
});

test('readNow declines what pread must refuse or cannot finish, leaving it to pread', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'disk.raw');
  writeFileSync(path, randomBytes(8192));
  const raw = await openRaw(path, { readOnly: true });
  t.after(() => raw.close());
  const dev = new Backend(raw);
  assert.equal(dev.readNow(Buffer.alloc(4096), 8192 - 100), false, 'past the end');
  assert.equal(dev.readNow(Buffer.alloc(0), 0), false, 'empty');
  await assert.rejects(dev.pread(Buffer.alloc(4096), 8192 - 100), { errno: 'EINVAL' });
  const window = new Backend(offsetFilter(raw, { offsetBytes: 4096, sizeBytes: 2048 }));
  const buf = Buffer.alloc(2048);
  assert.equal(window.readNow(buf, 0), true);
  const expect = Buffer.alloc(2048);
  await raw.pread(expect, 4096);
  assert.deepEqual(buf, expect);
  assert.equal(window.readNow(Buffer.alloc(1), 2048), false, 'outside the window');
});

test('a file system that cannot read without waiting is told apart from uncached data, and not asked again', async (t) => {
  // procfs files have no no-wait reads: preadv2(RWF_NOWAIT) fails with EOPNOTSUPP.
  const fd = openSync('/proc/version', 'r');
  t.after(() => closeSync(fd));
  assert.equal(tryPreadNowait(fd, Buffer.alloc(16), 0), 'unsupported');
  const dir = tempDir(t);
  const path = join(dir, 'disk.raw');
  writeFileSync(path, randomBytes(8192));
  const file = openSync(path, 'r');
  t.after(() => closeSync(file));
  assert.equal(tryPreadNowait(file, Buffer.alloc(4096), 0), 'done');
  assert.equal(tryPreadNowait(file, Buffer.alloc(4096), 8192 - 100), 'later', 'short at end of file');
  const reader = new NowaitReader(fd);
  const buf = Buffer.alloc(16);
  assert.equal(reader.read(buf, 0), false);
  assert.equal(reader.read(buf, 0), false);
  assert.deepEqual(buf, Buffer.alloc(16), 'nothing read');
});

test('a file in memory (tmpfs) that refuses no-wait reads is read here and now, the end of file left to ordinary reads', (t) => {
  // /dev/shm is tmpfs on Linux; tmpfs answers RWF_NOWAIT with EOPNOTSUPP (Linux 6.1 to 6.18 at least).
  const path = join('/dev/shm', `imgbd-nowait-${process.pid}-${Date.now()}`);
  const data = randomBytes(8192);
  writeFileSync(path, data);
  t.after(() => rmSync(path, { force: true }));
  assert.equal(statfsSync(path).type, TMPFS_MAGIC, '/dev/shm is tmpfs');
  const fd = openSync(path, 'r');
  t.after(() => closeSync(fd));
  const reader = new NowaitReader(fd);
  const buf = Buffer.alloc(4096);
  assert.equal(reader.read(buf, 4096), true);
  assert.deepEqual(buf, data.subarray(4096));
  assert.equal(reader.read(buf, 100), true);
  assert.deepEqual(buf, data.subarray(100, 4196));
  assert.equal(reader.read(buf, 8192 - 100), false, 'short at end of file');
});
