// Copying from the source's page cache through a mapping (sys/mmap.ts, image/mapped-source.ts):
// views hold exactly the file's bytes, are made only of cached pages inside the file, stop at a
// window's end; a transfer that maps reproduces raw and fragmented qcow2 sources, and keeps its
// views mapped until every write that reads them has finished, failed ones included.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, fsyncSync, openSync, readSync, writeSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { createQcow2 } from '../../src/formats/qcow2/create.js';
import { openQcow2Path } from '../../src/formats/qcow2/format.js';
import { openRaw } from '../../src/formats/raw/driver.js';
import { deviceTarget, transfer, type TransferTarget } from '../../src/image/transfer.js';
import { MappedFile } from '../../src/sys/mmap.js';
import { tempDir } from '../helpers/peers.js';
import { MemoryDevice } from './backend-memory-device.js';

const GiB = 1024 ** 3;

test('a view holds the cached bytes of the file, at any offset and length', (t) => {
  const path = join(tempDir(t), 'f');
  const data = randomBytes(300_000);
  writeFileSync(path, data);
  const fd = openSync(path, 'r');
  const m = new MappedFile(fd);
  t.after(() => {
    m.close();
    closeSync(fd);
  });
  for (const [offset, length] of [[0, 4096], [1, 1], [12345, 70_001], [300_000 - 9, 9], [0, 300_000]] as const) {
    const v = m.view(offset, length);
    assert.ok(v !== null, `view(${offset}, ${length})`);
    assert.deepEqual(Buffer.from(v.buf), data.subarray(offset, offset + length));
    v.release();
  }
});

test('no view reaches past the end of the file or into pages not cached', (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'f');
  const size = 3 * 4096 + 100;
  writeFileSync(path, randomBytes(size));
  const fd = openSync(path, 'r');
  t.after(() => closeSync(fd));
  const m = new MappedFile(fd);
  // Views are compared with null, never handed to assert: an error message that kept one would
  // be printed after close() unmapped it.
  const last = m.view(3 * 4096 + 50, 8192);
  assert.equal(last?.buf.length, 50, 'cut at the end of the file, not of its last page');
  assert.equal(m.view(size, 10) === null, true, 'at the end');
  assert.equal(m.view(0, 0) === null, true);
  assert.equal(m.view(-1, 10) === null, true);
  m.close();
  // Written back and dropped from the page cache (GNU dd's nocache): nothing to map without a read.
  const wfd = openSync(path, 'r+');
  fsyncSync(wfd);
  closeSync(wfd);
  const dd = spawnSync('dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none']);
  assert.equal(dd.status, 0, dd.stderr.toString());
  const m2 = new MappedFile(fd);
  t.after(() => m2.close());
  assert.equal(m2.view(0, 4096) === null, true, 'dropped pages');
  readSync(fd, Buffer.alloc(4096), 0, 4096, 0);
  assert.equal(m2.view(0, 4096) === null, false, 'read back into the cache');
});

test('a view stops at the end of its window; the next one starts there', (t) => {
  const path = join(tempDir(t), 'sparse');
  const fd = openSync(path, 'w+');
  t.after(() => closeSync(fd));
  const data = randomBytes(8192);
  writeSync(fd, data, 0, data.length, GiB - 4096);
  const m = new MappedFile(fd);
  t.after(() => m.close());
  const first = m.view(GiB - 4096 + 100, 8000);
  assert.ok(first !== null);
  assert.equal(m.view(GiB + 8192, 1) === null, true, 'past the end of the file');
  assert.equal(first.buf.length, 4096 - 100);
  assert.deepEqual(Buffer.from(first.buf), data.subarray(100, 4096));
  const second = m.view(GiB, 8000 - first.buf.length);
  assert.ok(second !== null);
  assert.deepEqual(Buffer.from(second.buf), data.subarray(4096, 100 + 8000));
});

test('a descriptor that cannot be mapped gives no views', (t) => {
  const path = join(tempDir(t), 'fifo');
  assert.equal(spawnSync('mkfifo', [path]).status, 0);
  const fd = openSync(path, 'r+');
  const m = new MappedFile(fd);
  t.after(() => {
    m.close();
    closeSync(fd);
  });
  assert.equal(m.view(0, 4096) === null, true);
});

test('a transfer from a cached raw file maps it and reproduces it, or reads it when told not to map', async (t) => {
  const path = join(tempDir(t), 'src.raw');
  const data = Buffer.alloc(3 << 20);
  randomBytes(1 << 20).copy(data, 0);
  randomBytes(4096).copy(data, (2 << 20) + 12345);
  writeFileSync(path, data);
  const src = await openRaw(path, { readOnly: true });
  t.after(() => src.close());
  for (const mapSource of ['always', 'never'] as const) {
    const dst = new MemoryDevice(data.length);
    const stats = await transfer({ sources: [src], targets: [deviceTarget(dst)], requestBytes: 1 << 20, workers: 3, grainBytes: 4096, targetZeroed: true, mapSource });
    assert.ok(dst.data.equals(data), mapSource);
    assert.equal(stats.mappedBytes, mapSource === 'always' ? stats.readBytes : 0);
    assert.ok(stats.readBytes > 0);
  }
});

test('a transfer maps a fragmented qcow2 source run by run and reproduces it', async (t) => {
  const path = join(tempDir(t), 'frag.qcow2');
  const cluster = 65536;
  const size = 64 * cluster;
  await createQcow2(path, { sizeBytes: size, clusterSize: cluster });
  const img = await openQcow2Path(path);
  const expect = Buffer.alloc(size);
  // Clusters allocated in a scattered order: guest-adjacent clusters are apart on the host.
  const order = [...Array(48).keys()].map((i) => (i * 29) % 64);
  for (const c of order) {
    const piece = randomBytes(cluster);
    piece.copy(expect, c * cluster);
    await img.pwrite!(piece, c * cluster);
  }
  await img.close();
  const src = await openQcow2Path(path, { readOnly: true });
  t.after(() => src.close());
  // The L2 table is cached by a first read: mapping only uses tables already in memory.
  await src.pread(Buffer.alloc(512), 0);
  const dst = new MemoryDevice(size);
  const stats = await transfer({ sources: [src], targets: [deviceTarget(dst)], requestBytes: 8 * cluster, workers: 2, grainBytes: cluster, targetZeroed: true, mapSource: 'always' });
  assert.ok(dst.data.equals(expect));
  assert.ok(stats.mappedBytes > 0, 'data clusters were mapped');
});

test('a failed write does not unmap what other writes of the request still read', async (t) => {
  const path = join(tempDir(t), 'src.raw');
  const data = randomBytes(1 << 20);
  // Every other 4 KiB zeroed: one request, many writes.
  for (let p = 4096; p < data.length; p += 8192) data.fill(0, p, p + 4096);
  writeFileSync(path, data);
  const src = await openRaw(path, { readOnly: true });
  t.after(() => src.close());
  const dst = new MemoryDevice(data.length);
  let slowFinished = false;
  let calls = 0;
  const target: TransferTarget = {
    ...deviceTarget(dst),
    write: async (buf, offset) => {
      // The first write fails at once; the second is still reading its view 50 ms later.
      if (calls++ === 0) throw new Error('first write fails');
      await new Promise((r) => setTimeout(r, 50));
      assert.deepEqual(Buffer.from(buf.subarray(0, 16)), data.subarray(offset, offset + 16));
      slowFinished = true;
    },
  };
  await assert.rejects(
    transfer({ sources: [src], targets: [target], requestBytes: 1 << 20, workers: 1, grainBytes: 4096, targetZeroed: true, mapSource: 'always' }),
    /first write fails/,
  );
  assert.equal(slowFinished, true, 'the transfer failed only once the other writes were done');
});

test('by default the copy maps its source only once a fifth of what it reads is zeros', async (t) => {
  const dir = tempDir(t);
  const MiB = 1 << 20;
  for (const [name, zeroMiBs] of [['data only', 0], ['half zeros', 4]] as const) {
    const path = join(dir, `${name}.raw`);
    const data = randomBytes(8 * MiB);
    // Written zeros, not holes: they are read and found to be zeros.
    for (let m = 0; m < zeroMiBs; m++) data.fill(0, (2 * m + 1) * MiB, (2 * m + 2) * MiB);
    writeFileSync(path, data);
    const src = await openRaw(path, { readOnly: true });
    t.after(() => src.close());
    const dst = new MemoryDevice(data.length);
    const stats = await transfer({ sources: [src], targets: [deviceTarget(dst)], requestBytes: MiB, workers: 1, grainBytes: 65536, targetZeroed: true });
    assert.ok(dst.data.equals(data), name);
    if (zeroMiBs === 0) assert.equal(stats.mappedBytes, 0, 'all read, none zeros: the loop copies');
    else assert.ok(stats.mappedBytes >= 6 * MiB, `${name}: mapped ${stats.mappedBytes}`);
  }
});
