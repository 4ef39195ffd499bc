// The read-only filter: reads and metadata pass through; with the backend on top, every way
// to change the device is refused with EPERM (nbd-proto.md "Error values").

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Backend } from '../../src/block/backend.js';
import { readOnlyFilter } from '../../src/block/filters/read-only.js';
import { RequestError } from '../../src/errors.js';
import { MemoryDevice } from './backend-memory-device.js';

function filled(): Buffer {
  const b = Buffer.alloc(65536);
  for (let i = 0; i < b.length; i++) b[i] = (i >> 8) & 0xff;
  return b;
}

test('read-only filter: reads pass, the backend refuses writes with EPERM', async () => {
  const dev = new MemoryDevice(filled());
  const ro = readOnlyFilter(dev);
  assert.equal(ro.pwrite, undefined);
  assert.equal(ro.capabilities().writable, false);
  const b = new Backend(ro);
  const got = Buffer.alloc(256);
  await b.pread(got, 512);
  assert.deepEqual(got, dev.data.subarray(512, 768));
  await assert.rejects(b.pwrite(Buffer.alloc(1), 0), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM');
  await assert.rejects(b.zero(0, 1), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM');
  await assert.rejects(b.trim(0, 1), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM');
  assert.deepEqual(await b.extents(0, 100), [{ length: 100, flags: 0 }]);
  assert.deepEqual(dev.calls, ['pread 512 256', 'extents 0 100']);
});
