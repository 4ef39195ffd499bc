// The synchronous write path (BlockDevice.writeNow) of raw and qcow2 images: it writes only
// where nothing but a buffered write is needed and nothing queued could land after it, and
// leaves everything else to pwrite.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { Backend } from '../../src/block/backend.js';
import { offsetFilter } from '../../src/block/filters/offset.js';
import { createQcow2 } from '../../src/formats/qcow2/create.js';
import { Qcow2Device } from '../../src/formats/qcow2/driver.js';
import { openRaw } from '../../src/formats/raw/driver.js';
import { HostFile } from '../../src/io/host-file.js';
import { tempDir } from '../helpers/peers.js';

const CS = 65536;

test('raw: writeNow writes at once; it declines FUA, the end, a read-only file and ranges a queued write covers', async (t) => {
  const path = join(tempDir(t), 'disk.raw');
  writeFileSync(path, Buffer.alloc(1 << 20));
  const raw = await openRaw(path, { readOnly: false });
  t.after(() => raw.close());
  const dev = new Backend(raw);
  const data = randomBytes(8192);
  assert.equal(dev.writeNow(data, 4096), true);
  assert.deepEqual(readFileSync(path).subarray(4096, 4096 + 8192), data, 'on the file before any await');
  assert.equal(dev.writeNow(data, (1 << 20) - 100), false, 'past the end');
  assert.equal(dev.writeNow(Buffer.alloc(0), 0), false, 'empty');
  assert.equal(dev.writeNow(data, 0, { fua: true }), false, 'FUA waits for a flush');
  // A write still queued (the combiner sends it at the end of this turn) covers [64K, 64K+8K).
  const queued = dev.pwrite(Buffer.alloc(8192, 1), 65536);
  assert.equal(dev.writeNow(data, 65536 + 4096), false, 'would land before the queued write');
  assert.equal(dev.writeNow(data, 131072), true, 'elsewhere is fine');
  await queued;
  assert.equal(dev.writeNow(data, 65536 + 4096), true, 'once it is written');
  const window = new Backend(offsetFilter(raw, { offsetBytes: 65536, sizeBytes: 65536 }));
  assert.equal(window.writeNow(Buffer.alloc(10, 7), 100), true);
  assert.deepEqual(readFileSync(path).subarray(65536 + 100, 65536 + 110), Buffer.alloc(10, 7));
  assert.equal(window.writeNow(Buffer.alloc(10, 7), 65530), false, 'outside the window');
  const ro = await openRaw(path, { readOnly: true });
  t.after(() => ro.close());
  assert.equal(ro.writeNow(data, 0), false);
});

test('qcow2: writeNow goes in place into clusters the image owns alone, never allocates, never overtakes a request', async (t) => {
  const path = join(tempDir(t), 'w.qcow2');
  await createQcow2(path, { sizeBytes: 16 * CS });
  const dev = await Qcow2Device.open(await HostFile.open(path));
  t.after(() => dev.close());
  const data = randomBytes(4096);
  assert.equal(dev.writeNow(data, 0), false, 'an unallocated cluster needs allocating');
  await dev.pwrite(Buffer.alloc(2 * CS, 0x11), 0);
  assert.equal(dev.writeNow(data, 100), true);
  assert.equal(dev.writeNow(Buffer.alloc(CS, 0x22), CS / 2), true, 'two neighbouring clusters, adjacent on the host');
  assert.equal(dev.writeNow(data, 2 * CS - 10), false, 'reaches an unallocated cluster');
  const read = Buffer.alloc(2 * CS);
  await dev.pread(read, 0);
  const expect = Buffer.alloc(2 * CS, 0x11);
  data.copy(expect, 100);
  expect.fill(0x22, CS / 2, CS / 2 + CS);
  assert.deepEqual(read, expect);
  // A request holding cluster 0 (a read waiting on the thread pool) keeps writeNow out of it.
  const pending = dev.pread(Buffer.alloc(10), 0);
  assert.equal(dev.writeNow(data, 0), false);
  assert.equal(dev.writeNow(data, CS), true, 'the next cluster is free');
  await pending;
  // A zeroed cluster (zero flag) needs its entry rewritten.
  await dev.zero(CS, CS, { mayTrim: false });
  assert.equal(dev.writeNow(data, CS), false);
  // After a snapshot every cluster is shared: the next write copies it first.
  await dev.createSnapshot('s1');
  assert.equal(dev.writeNow(data, 0), false, 'shared with the snapshot');
  await dev.pwrite(data, 0);
  assert.equal(dev.writeNow(data, 0), true, 'copied: its own again');
  const chk = await dev.check();
  assert.deepEqual([chk.corruptions, chk.leaks], [0, 0], chk.messages.join('\n'));
});
