// The backend wrapper: one row per validation rule (asserting the errno nbd-proto.md asks
// for), then the emulations (zero by writing, fast zero, FUA by flush, extents, cache).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Backend, sanitizeExtents } from '../../src/block/backend.js';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../src/block/device.js';
import { RequestError, type NbdErrno } from '../../src/errors.js';
import { MemoryDevice, type MemoryDeviceOptions } from './backend-memory-device.js';

const SIZE = 1 << 20;

function backend(opts: MemoryDeviceOptions = {}, readOnly = false, size = SIZE): { b: Backend; dev: MemoryDevice } {
  const dev = new MemoryDevice(size, opts);
  return { b: new Backend(dev, { readOnly }), dev };
}

function isErrno(errno: NbdErrno) {
  return (e: unknown) => e instanceof RequestError && e.errno === errno;
}

interface Row {
  readonly rule: string;
  readonly errno: NbdErrno;
  readonly dev?: MemoryDeviceOptions;
  readonly readOnly?: boolean;
  readonly size?: number;
  readonly call: (b: Backend) => Promise<unknown>;
}

const rows: Row[] = [
  { rule: 'read past the end', errno: 'EINVAL', call: (b) => b.pread(Buffer.alloc(512), SIZE - 256) },
  { rule: 'read starting past the end', errno: 'EINVAL', call: (b) => b.pread(Buffer.alloc(1), SIZE) },
  { rule: 'write past the end', errno: 'ENOSPC', call: (b) => b.pwrite(Buffer.alloc(512), SIZE - 256) },
  { rule: 'write-zeroes past the end', errno: 'ENOSPC', call: (b) => b.zero(SIZE - 10, 20) },
  { rule: 'trim past the end', errno: 'EINVAL', call: (b) => b.trim(SIZE - 10, 20) },
  { rule: 'block status past the end', errno: 'EINVAL', call: (b) => b.extents(SIZE, 1) },
  { rule: 'cache past the end', errno: 'EINVAL', call: (b) => b.cache(SIZE - 1, 2) },
  { rule: 'negative offset', errno: 'EINVAL', call: (b) => b.pread(Buffer.alloc(1), -1) },
  { rule: 'offset not an integer', errno: 'EINVAL', call: (b) => b.pread(Buffer.alloc(1), 0.5) },
  { rule: 'offset above 2^53', errno: 'EINVAL', call: (b) => b.trim(2 ** 53, 1) },
  { rule: 'read offset not aligned to the minimum block size', errno: 'EINVAL', dev: { sizes: { minimum: 512 } }, call: (b) => b.pread(Buffer.alloc(512), 256) },
  { rule: 'write length not aligned to the minimum block size', errno: 'EINVAL', dev: { sizes: { minimum: 512 } }, call: (b) => b.pwrite(Buffer.alloc(100), 0) },
  { rule: 'zero not aligned to the minimum block size', errno: 'EINVAL', dev: { sizes: { minimum: 4096 } }, call: (b) => b.zero(4096, 512) },
  { rule: 'read longer than the maximum payload', errno: 'EINVAL', dev: { sizes: { maximum: 65536 } }, call: (b) => b.pread(Buffer.alloc(65536 + 512), 0) },
  { rule: 'write longer than the maximum payload', errno: 'EINVAL', dev: { sizes: { maximum: 65536 } }, call: (b) => b.pwrite(Buffer.alloc(131072), 0) },
  { rule: 'write to a read-only export', errno: 'EPERM', readOnly: true, call: (b) => b.pwrite(Buffer.alloc(1), 0) },
  { rule: 'trim on a read-only export', errno: 'EPERM', readOnly: true, call: (b) => b.trim(0, 1) },
  { rule: 'write-zeroes on a read-only export', errno: 'EPERM', readOnly: true, call: (b) => b.zero(0, 1) },
  { rule: 'write to a layer that is not writable', errno: 'EPERM', dev: { caps: { writable: false } }, call: (b) => b.pwrite(Buffer.alloc(1), 0) },
  { rule: 'write to a layer without pwrite', errno: 'EPERM', dev: { without: ['pwrite'] }, call: (b) => b.pwrite(Buffer.alloc(1), 0) },
  { rule: 'trim not supported by the layer', errno: 'EINVAL', dev: { caps: { trim: false } }, call: (b) => b.trim(0, 512) },
  { rule: 'FUA on a read-only export', errno: 'EPERM', readOnly: true, call: (b) => b.pwrite(Buffer.alloc(1), 0, { fua: true }) },
  { rule: 'flush on a read-only layer with nothing to flush', errno: 'EINVAL', dev: { caps: { writable: false, flush: false } }, call: (b) => b.flush() },
  { rule: 'fast zero on a layer that cannot zero fast', errno: 'ENOTSUP', dev: { caps: { fastZero: false } }, call: (b) => b.zero(0, 512, { fast: true }) },
  { rule: 'fast zero on a layer without zero()', errno: 'ENOTSUP', dev: { without: ['zero'] }, call: (b) => b.zero(0, 512, { fast: true }) },
  { rule: 'fast zero that the layer refuses late', errno: 'ENOTSUP', dev: { zeroNotSupported: true }, call: (b) => b.zero(0, 512, { fast: true }) },
  { rule: 'block status of length 0', errno: 'EINVAL', call: (b) => b.extents(0, 0) },
  { rule: 'allocation depth of length 0', errno: 'EINVAL', call: (b) => b.allocationDepth(0, 0) },
  { rule: 'out of range beats read-only (nbdkit order)', errno: 'ENOSPC', readOnly: true, call: (b) => b.pwrite(Buffer.alloc(2), SIZE - 1) },
];

for (const row of rows) {
  test(`validation: ${row.rule} -> ${row.errno}`, async () => {
    const { b, dev } = backend(row.dev, row.readOnly, row.size);
    await assert.rejects(row.call(b), isErrno(row.errno));
    const mutations = dev.calls.filter((c) => !c.startsWith('pread') && !c.startsWith('extents') && !c.startsWith('cache'));
    if (row.errno !== 'ENOTSUP' || !row.dev?.zeroNotSupported) assert.deepEqual(mutations, [], 'nothing reached the layer');
  });
}

test('zero-length read/write/trim/zero/cache are no-ops that succeed, also at the very end', async () => {
  const { b, dev } = backend();
  await b.pread(Buffer.alloc(0), SIZE);
  await b.pwrite(Buffer.alloc(0), 0);
  await b.trim(SIZE, 0);
  await b.zero(0, 0);
  await b.cache(0, 0);
  assert.deepEqual(dev.calls, []);
});

test('a request may end at an unaligned export end', async () => {
  const { b, dev } = backend({ sizes: { minimum: 512 } }, false, 1000);
  const buf = Buffer.alloc(488, 1);
  await b.pwrite(buf, 512);
  assert.deepEqual(dev.data.subarray(512, 1000), buf);
  await assert.rejects(b.pwrite(Buffer.alloc(400), 512), isErrno('EINVAL'));
});

test('zero is emulated by writing zeros in bounded chunks when the layer has no zero()', async () => {
  const size = 3 * 1024 * 1024 + 4096;
  const dev = new MemoryDevice(Buffer.alloc(size, 0xaa), { without: ['zero'] });
  const b = new Backend(dev);
  await b.zero(4096, size - 8192);
  assert.ok(dev.data.subarray(4096, size - 4096).every((x) => x === 0));
  assert.ok(dev.data.subarray(0, 4096).every((x) => x === 0xaa));
  assert.ok(dev.data.subarray(size - 4096).every((x) => x === 0xaa));
  const writes = dev.calls.filter((c) => c.startsWith('pwrite'));
  assert.ok(writes.length >= 3, 'more than one chunk');
  for (const w of writes) assert.ok(Number(w.split(' ')[2]) <= 1024 * 1024, `chunk ${w} is at most 1 MiB`);
  assert.equal(b.capabilities().zero, true);
  assert.equal(b.capabilities().fastZero, true, 'fast zero is advertised: a fast ENOTSUP is a valid answer');
});

test('zero chunks respect a small maximum block size', async () => {
  const dev = new MemoryDevice(Buffer.alloc(65536, 1), { without: ['zero'], sizes: { minimum: 512, maximum: 8192 } });
  await new Backend(dev).zero(0, 65536);
  assert.equal(dev.calls.length, 8);
  assert.ok(dev.data.every((x) => x === 0));
});

test('a layer that finds out late it cannot zero falls back to writing zeros', async () => {
  const dev = new MemoryDevice(Buffer.alloc(8192, 1), { zeroNotSupported: true });
  await new Backend(dev).zero(0, 4096, { mayTrim: true });
  assert.deepEqual(dev.calls, ['zero 0 4096 trim', 'pwrite 0 4096']);
  assert.ok(dev.data.subarray(0, 4096).every((x) => x === 0));
});

test('zero passes mayTrim and fast down to a layer that zeroes natively', async () => {
  const { b, dev } = backend();
  await b.zero(0, 512, { mayTrim: true, fast: true });
  await b.zero(512, 512);
  assert.deepEqual(dev.calls, ['zero 0 512 trim fast', 'zero 512 512']);
});

test('FUA is emulated by a flush after the operation when the layer has no native FUA', async () => {
  const { b, dev } = backend();
  assert.equal(b.capabilities().fua, true);
  await b.pwrite(Buffer.alloc(512, 1), 0, { fua: true });
  await b.zero(512, 512, { fua: true });
  await b.trim(1024, 512, { fua: true });
  await b.pwrite(Buffer.alloc(512, 1), 0);
  assert.deepEqual(dev.calls, ['pwrite 0 512', 'flush', 'zero 512 512', 'flush', 'trim 1024 512', 'flush', 'pwrite 0 512']);
});

test('FUA goes down as a flag when the layer has native FUA', async () => {
  const { b, dev } = backend({ caps: { fua: true } });
  await b.pwrite(Buffer.alloc(512, 1), 0, { fua: true });
  await b.zero(512, 512, { fua: true });
  assert.deepEqual(dev.calls, ['pwrite 0 512 fua', 'zero 512 512 fua']);
});

test('FUA on a zero emulated by writes flushes once at the end', async () => {
  const { b, dev } = backend({ without: ['zero'] });
  await b.zero(0, 1024, { fua: true });
  assert.deepEqual(dev.calls, ['pwrite 0 1024', 'flush']);
});

test('a writable layer with nothing to flush: flush and FUA succeed without calling it', async () => {
  const { b, dev } = backend({ caps: { flush: false }, without: ['flush'] });
  assert.equal(b.capabilities().flush, true);
  await b.flush();
  await b.pwrite(Buffer.alloc(1), 0, { fua: true });
  assert.deepEqual(dev.calls, ['pwrite 0 1']);
});

test('extents default to one data extent; allocation depth to depth 1', async () => {
  const { b, dev } = backend({ without: ['extents'] });
  assert.deepEqual(await b.extents(4096, 8192), [{ length: 8192, flags: 0 }]);
  assert.deepEqual(await b.allocationDepth(0, SIZE), [{ length: SIZE, depth: 1 }]);
  assert.deepEqual(dev.calls, []);
});

test('extents from the layer are clipped to the request, and to one with REQ_ONE', async () => {
  const H = EXTENT_HOLE | EXTENT_ZERO;
  const { b } = backend({
    extents: () => [
      { length: 4096, flags: H },
      { length: 4096, flags: 0 },
      { length: 1 << 19, flags: H },
    ],
  });
  assert.deepEqual(await b.extents(0, 10000), [
    { length: 4096, flags: H },
    { length: 4096, flags: 0 },
    { length: 10000 - 8192, flags: H },
  ]);
  assert.deepEqual(await b.extents(0, 10000, { one: true }), [{ length: 4096, flags: H }]);
  assert.deepEqual(await b.extents(0, 100, { one: true }), [{ length: 100, flags: H }]);
});

test('broken extents from a layer become EIO, unknown flag bits are dropped', () => {
  assert.throws(() => sanitizeExtents([], 10, false), isErrno('EIO'));
  assert.throws(() => sanitizeExtents([{ length: 0, flags: 0 }], 10, false), isErrno('EIO'));
  assert.throws(() => sanitizeExtents([{ length: 5, flags: 0 }, { length: -1, flags: 0 }], 10, false), isErrno('EIO'));
  assert.deepEqual(sanitizeExtents([{ length: 5, flags: 0xff }], 10, false), [{ length: 5, flags: 3 }]);
  const fine = [{ length: 5, flags: 1 }];
  assert.equal(sanitizeExtents(fine, 10, false), fine, 'valid lists pass without copying');
});

test('cache without native support reads and discards in chunks', async () => {
  const { b, dev } = backend();
  await b.cache(0, SIZE);
  assert.deepEqual(dev.calls, ['pread 0 1048576']);
  const { b: b2, dev: dev2 } = backend({ caps: { cache: true } });
  await b2.cache(0, 4096);
  assert.deepEqual(dev2.calls, ['cache 0 4096']);
});

test('effective capabilities of a read-only export', () => {
  const { b } = backend({}, true);
  const c = b.capabilities();
  assert.equal(c.writable, false);
  assert.equal(c.trim, false);
  assert.equal(c.zero, false);
  assert.equal(c.fastZero, false);
  assert.equal(c.fua, false);
  assert.equal(c.flush, true, 'the layer itself can still flush');
  assert.equal(c.extents, true);
  assert.equal(c.multiConn, true);
});

test('invalid block sizes from a layer are refused at construction', () => {
  assert.throws(() => new Backend(new MemoryDevice(4096, { sizes: { minimum: 3 } })), /block sizes/);
  assert.throws(() => new Backend(new MemoryDevice(4096, { sizes: { minimum: 131072, preferred: 131072 } })), /block sizes/);
  assert.throws(() => new Backend(new MemoryDevice(4096, { sizes: { minimum: 512, maximum: 1000 } })), /block sizes/);
});

test('close closes the layer once', async () => {
  const { b, dev } = backend();
  await Promise.all([b.close(), b.close()]);
  assert.equal(dev.closed, 1);
});
