// The offset filter: a window onto the next device. Offsets are remapped, extents clipped at
// the window's end, and nothing outside the window can be reached.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { offsetFilter } from '../../src/block/filters/offset.js';
import { RequestError, UsageError } from '../../src/errors.js';
import { MemoryDevice } from './backend-memory-device.js';

function filled(): Buffer {
  const b = Buffer.alloc(65536);
  for (let i = 0; i < b.length; i++) b[i] = (i >> 8) & 0xff;
  return b;
}

test('reads and writes are shifted by the offset', async () => {
  const dev = new MemoryDevice(filled());
  const w = offsetFilter(dev, { offsetBytes: 4096, sizeBytes: 8192 });
  assert.equal(w.sizeBytes, 8192);
  const got = Buffer.alloc(512);
  await w.pread(got, 0);
  assert.deepEqual(got, dev.data.subarray(4096, 4608));
  await w.pwrite!(Buffer.alloc(16, 0xee), 8192 - 16);
  assert.ok(dev.data.subarray(12288 - 16, 12288).every((x) => x === 0xee));
  assert.equal(dev.data[12288], 12288 >> 8, 'the byte after the window is untouched');
  await w.zero!(0, 16);
  await w.trim!(16, 16);
  assert.deepEqual(dev.calls.slice(-2), ['zero 4096 16', 'trim 4112 16']);
});

test('requests outside the window are refused before reaching the device', async () => {
  const dev = new MemoryDevice(filled());
  const w = offsetFilter(dev, { offsetBytes: 4096, sizeBytes: 8192 });
  await assert.rejects(w.pread(Buffer.alloc(2), 8191), (e: unknown) => e instanceof RequestError && e.errno === 'EINVAL');
  await assert.rejects(w.pwrite!(Buffer.alloc(2), 8191), (e: unknown) => e instanceof RequestError && e.errno === 'ENOSPC');
  await assert.rejects(w.zero!(8192, 1), (e: unknown) => e instanceof RequestError && e.errno === 'ENOSPC');
  await assert.rejects(w.pread(Buffer.alloc(1), -1), (e: unknown) => e instanceof RequestError);
  assert.deepEqual(dev.calls, []);
});

test('extents are remapped and clipped to the window', async () => {
  const dev = new MemoryDevice(65536, {
    extents: (offset, length) => {
      // Data in [0, 6000), hole after: reply from `offset`, possibly past the request.
      const out = [];
      if (offset < 6000) out.push({ length: 6000 - offset, flags: 0 });
      out.push({ length: 65536 - Math.max(offset, 6000), flags: 3 });
      void length;
      return out;
    },
  });
  const w = offsetFilter(dev, { offsetBytes: 4096, sizeBytes: 4096 });
  assert.deepEqual(await w.extents!(0, 4096), [
    { length: 6000 - 4096, flags: 0 },
    { length: 4096 - (6000 - 4096), flags: 3 },
  ]);
  assert.deepEqual(await w.extents!(2048, 100), [{ length: 100, flags: 3 }]);
  assert.deepEqual(dev.calls, ['extents 4096 4096', 'extents 6144 100']);
});

test('a window that does not fit, or is misaligned, is a usage error', () => {
  const dev = new MemoryDevice(65536, { sizes: { minimum: 512 } });
  assert.throws(() => offsetFilter(dev, { offsetBytes: 65536 - 100, sizeBytes: 200 }), UsageError);
  assert.throws(() => offsetFilter(dev, { offsetBytes: 70000 }), UsageError);
  assert.throws(() => offsetFilter(dev, { offsetBytes: 100 }), UsageError);
  assert.equal(offsetFilter(dev, { offsetBytes: 1024 }).sizeBytes, 65536 - 1024);
});

test('missing operations of the next device stay missing', () => {
  const dev = new MemoryDevice(65536, { without: ['trim', 'extents'] });
  const w = offsetFilter(dev, { offsetBytes: 0 });
  assert.equal(w.trim, undefined);
  assert.equal(w.extents, undefined);
  assert.equal(typeof w.zero, 'function');
});
