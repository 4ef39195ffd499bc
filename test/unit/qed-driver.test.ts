// The QED driver without peers: a seeded random workload against an in-memory model (with and
// without a raw backing file), the need-check bit's life cycle, repair on a writable open,
// growing resize, zero clusters over a backing file, and where a backing file may live.

import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../src/block/device.js';
import { CorruptImageError, RequestError, UnsupportedImageError, UsageError } from '../../src/errors.js';
import { openImageWithFormat } from '../../src/formats/open.js';
import { probeFormat, readProbeHead } from '../../src/formats/probe.js';
import { createQcow2 } from '../../src/formats/qcow2/create.js';
import { createQed } from '../../src/formats/qed/create.js';
import { openQedPath } from '../../src/formats/qed/format.js';
import { QED_F } from '../../src/formats/qed/header.js';
import { prng, readAll } from '../fixtures/qcow2/helpers.js';
import { tempDir } from '../helpers/peers.js';

const MiB = 1024 * 1024;
const features = (p: string): number => Number(readFileSync(p).readBigUInt64LE(16));

function randomBytes(rand: () => number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i += 4) b.writeUInt32LE((rand() * 0x1_0000_0000) >>> 0, Math.min(i, n - 4));
  return b;
}

async function workload(t: import('node:test').TestContext, withBacking: boolean): Promise<void> {
  const dir = tempDir(t);
  const size = 24 * MiB;
  const cs = 64 * 1024;
  const rand = prng(withBacking ? 7 : 3);
  const model = Buffer.alloc(size);
  if (withBacking) {
    // A backing file shorter than the image: its tail reads as zeros.
    const base = randomBytes(rand, 20 * MiB);
    writeFileSync(join(dir, 'base.raw'), base);
    base.copy(model);
  }
  const p = join(dir, 'w.qed');
  await createQed(p, { sizeBytes: size, ...(withBacking ? { backingFile: 'base.raw', backingFormat: 'raw' } : {}) });
  let dev = await openQedPath(p);
  for (let i = 0; i < 300; i++) {
    const aligned = rand() < 0.4;
    let off = Math.floor(rand() * size);
    let len = 1 + Math.floor(rand() * (rand() < 0.2 ? 4 * MiB : 200 * 1024));
    if (aligned) {
      off -= off % cs;
      len = Math.max(cs, len - (len % cs));
    }
    len = Math.min(len, size - off);
    const op = rand();
    if (op < 0.6) {
      const data = randomBytes(rand, len);
      await dev.pwrite(data, off);
      data.copy(model, off);
    } else if (op < 0.8) {
      await dev.zero!(off, len, { mayTrim: rand() < 0.5 });
      model.fill(0, off, off + len);
    } else {
      await dev.trim!(off, len);
      // Whole clusters inside the range read as zeros; the partial edges keep their data.
      const a = Math.ceil(off / cs) * cs;
      const b = off + len === size ? size : Math.floor((off + len) / cs) * cs;
      if (b > a) model.fill(0, a, b);
    }
    if (i % 50 === 49) {
      assert.ok((await readAll(dev)).equals(model), `content after op ${i}`);
      await dev.close();
      dev = await openQedPath(p);
    }
  }
  await dev.close();
  assert.equal(features(p) & QED_F.NEED_CHECK, 0);
  const ro = await openQedPath(p, { readOnly: true });
  t.after(() => ro.close());
  assert.ok((await readAll(ro)).equals(model));
}

test('qed driver: 300 random writes/zeroes/trims match a model (no backing)', (t) => workload(t, false));
test('qed driver: 300 random writes/zeroes/trims match a model (raw backing)', (t) => workload(t, true));

test('qed need-check: set before the first allocating write, cleared by flush and close', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'n.qed');
  await createQed(p, { sizeBytes: 8 * MiB });
  const dev = await openQedPath(p);
  t.after(() => dev.close());
  assert.equal(features(p) & QED_F.NEED_CHECK, 0);
  await dev.pwrite(Buffer.alloc(100, 1), 5000);
  assert.equal(features(p) & QED_F.NEED_CHECK, QED_F.NEED_CHECK);
  await dev.flush!();
  assert.equal(features(p) & QED_F.NEED_CHECK, 0);
  // An in-place write changes no metadata and leaves the bit clear.
  await dev.pwrite(Buffer.alloc(100, 2), 5000);
  assert.equal(features(p) & QED_F.NEED_CHECK, 0);
  await dev.pwrite(Buffer.alloc(100, 3), 4 * MiB);
  assert.equal(features(p) & QED_F.NEED_CHECK, QED_F.NEED_CHECK);
  await dev.close();
  assert.equal(features(p) & QED_F.NEED_CHECK, 0);
});

test('qed repair: a dirty image with invalid entries and a leaked tail is fixed on a writable open', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'r.qed');
  await createQed(p, { sizeBytes: 8 * MiB, clusterSize: 4096, tableSize: 1 });
  let dev = await openQedPath(p);
  await dev.pwrite(Buffer.alloc(4096, 0xab), 0);
  await dev.pwrite(Buffer.alloc(4096, 0xcd), 4096);
  await dev.close();
  const img = readFileSync(p);
  const l2 = Number(img.readBigUInt64LE(4096));
  const good = img.readBigUInt64LE(l2);
  img.writeBigUInt64LE(4096n * 500n, l2 + 8); // past EOF
  img.writeBigUInt64LE(BigInt(QED_F.NEED_CHECK), 16);
  // Two appended clusters nothing references, as a crash between data and L2 update leaves.
  writeFileSync(p, Buffer.concat([img, Buffer.alloc(8192, 0xee)]));
  const before = statSync(p).size;

  const ro = await openQedPath(p, { readOnly: true });
  assert.equal(ro.checkResult, null);
  assert.ok(ro.needCheck);
  await ro.close();
  assert.equal(statSync(p).size, before);

  dev = await openQedPath(p);
  assert.equal(dev.checkResult?.invalidEntries, 1);
  assert.equal(dev.checkResult?.duplicateReferences, 0);
  // The cluster 0xcd was in is leaked too: its reference was the invalid one.
  assert.equal(dev.checkResult?.leakedClusters, 3);
  assert.equal(dev.needCheck, false);
  assert.equal(features(p) & QED_F.NEED_CHECK, 0);
  // Everything after the last referenced cluster goes: the two appended ones and the cluster
  // whose only reference was cleared (it was the last one written).
  assert.equal(statSync(p).size, before - 8192 - 4096);
  const buf = Buffer.alloc(8192);
  await dev.pread(buf, 0);
  assert.ok(buf.subarray(0, 4096).every((b) => b === 0xab));
  assert.ok(buf.subarray(4096).every((b) => b === 0), 'the cleared entry reads as unallocated');
  await dev.close();
  assert.equal(readFileSync(p).readBigUInt64LE(l2), good);
  assert.equal(readFileSync(p).readBigUInt64LE(l2 + 8), 0n);
});

test('qed repair: a cluster referenced twice refuses a writable open but reads read-only', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'd.qed');
  await createQed(p, { sizeBytes: 8 * MiB, clusterSize: 4096, tableSize: 1 });
  const dev = await openQedPath(p);
  await dev.pwrite(Buffer.alloc(4096, 0x11), 0);
  await dev.close();
  const img = readFileSync(p);
  const l2 = Number(img.readBigUInt64LE(4096));
  img.writeBigUInt64LE(img.readBigUInt64LE(l2), l2 + 8);
  img.writeBigUInt64LE(BigInt(QED_F.NEED_CHECK), 16);
  writeFileSync(p, img);
  await assert.rejects(openQedPath(p), (e: unknown) => e instanceof CorruptImageError && /referenced more than once/.test(e.message));
  const ro = await openQedPath(p, { readOnly: true });
  t.after(() => ro.close());
  const buf = Buffer.alloc(8192);
  await ro.pread(buf, 0);
  assert.ok(buf.every((b) => b === 0x11));
});

test('qed resize: grows, the new space reads as zeros, shrinking is refused', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'g.qed');
  await createQed(p, { sizeBytes: 4 * MiB });
  const dev = await openQedPath(p);
  await dev.pwrite(Buffer.alloc(1000, 9), 4 * MiB - 1000);
  await dev.resize(10 * MiB);
  assert.equal(dev.sizeBytes, 10 * MiB);
  await dev.pwrite(Buffer.alloc(10, 8), 10 * MiB - 10);
  await assert.rejects(dev.resize(MiB), UsageError);
  await assert.rejects(dev.resize(10 * MiB + 100), UsageError);
  await dev.close();
  const ro = await openQedPath(p, { readOnly: true });
  t.after(() => ro.close());
  assert.equal(ro.sizeBytes, 10 * MiB);
  const all = await readAll(ro);
  assert.ok(all.subarray(4 * MiB - 1000, 4 * MiB).every((b) => b === 9));
  assert.ok(all.subarray(4 * MiB, 10 * MiB - 10).every((b) => b === 0));
  assert.ok(all.subarray(10 * MiB - 10).every((b) => b === 8));
});

test('qed zero over a backing file: zero clusters hide the backing data, extents and depth say so', async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'base.raw'), Buffer.alloc(4 * MiB, 0x5a));
  const p = join(dir, 'z.qed');
  await createQed(p, { sizeBytes: 4 * MiB, backingFile: 'base.raw', backingFormat: 'raw' });
  const dev = await openQedPath(p);
  t.after(() => dev.close());
  await dev.zero!(MiB, MiB);
  await dev.pwrite(Buffer.alloc(10, 1), 3 * MiB);
  const all = await readAll(dev);
  assert.ok(all.subarray(0, MiB).every((b) => b === 0x5a));
  assert.ok(all.subarray(MiB, 2 * MiB).every((b) => b === 0));
  assert.deepEqual(await dev.extents!(0, 4 * MiB), [
    { length: MiB, flags: 0 },
    { length: MiB, flags: EXTENT_HOLE | EXTENT_ZERO },
    { length: 2 * MiB, flags: 0 },
  ]);
  assert.deepEqual(await dev.allocationDepth!(0, 4 * MiB), [
    { length: MiB, depth: 2 },
    { length: MiB, depth: 1 },
    { length: MiB, depth: 2 },
    { length: 64 * 1024, depth: 1 },
    { length: MiB - 64 * 1024, depth: 2 },
  ]);
});

test('qed backing path: confined to the image directory tree unless allowBacking says otherwise', async (t) => {
  const dir = tempDir(t);
  const other = tempDir(t);
  mkdirSync(join(dir, 'sub'));
  writeFileSync(join(dir, 'sub', 'in.raw'), Buffer.alloc(MiB, 1));
  writeFileSync(join(other, 'out.raw'), Buffer.alloc(MiB, 2));
  const inside = join(dir, 'inside.qed');
  const outside = join(dir, 'outside.qed');
  const dotdot = join(dir, 'sub', 'dotdot.qed');
  await createQed(inside, { sizeBytes: MiB, backingFile: 'sub/in.raw', backingFormat: 'raw' });
  await createQed(outside, { sizeBytes: MiB, backingFile: join(other, 'out.raw'), backingFormat: 'raw' });
  await createQed(dotdot, { sizeBytes: MiB, backingFile: '../../' + other.split('/').pop() + '/out.raw', backingFormat: 'raw' });

  const a = await openQedPath(inside, { readOnly: true });
  const buf = Buffer.alloc(16);
  await a.pread(buf, 0);
  assert.ok(buf.every((b) => b === 1));
  await a.close();

  for (const p of [outside, dotdot]) {
    await assert.rejects(openQedPath(p, { readOnly: true }), (e: unknown) => e instanceof UnsupportedImageError && /outside the allowed directories/.test(e.message));
  }
  const b = await openQedPath(outside, { readOnly: true, allowBacking: [other] });
  await b.pread(buf, 0);
  assert.ok(buf.every((x) => x === 2));
  await b.close();
  await assert.rejects(openQedPath(inside, { readOnly: true, allowBacking: false }), /backing files are not allowed/);
});

test('qed: a partial write into a zero cluster fills the rest with zeros, not backing data', async (t) => {
  // qed_spec.rst: "The new data cluster is populated with zeroes and the data being written."
  // (QEMU 7.2 copies from the backing file here; the interop twin test works around that.)
  const dir = tempDir(t);
  writeFileSync(join(dir, 'base.raw'), Buffer.alloc(MiB, 0xaa));
  const p = join(dir, 'pz.qed');
  await createQed(p, { sizeBytes: MiB, backingFile: 'base.raw', backingFormat: 'raw' });
  const dev = await openQedPath(p);
  t.after(() => dev.close());
  await dev.zero!(0, 65536);
  await dev.pwrite(Buffer.alloc(512, 0x11), 0);
  const buf = Buffer.alloc(65536 + 512);
  await dev.pread(buf, 0);
  assert.ok(buf.subarray(0, 512).every((b) => b === 0x11));
  assert.ok(buf.subarray(512, 65536).every((b) => b === 0));
  assert.ok(buf.subarray(65536).every((b) => b === 0xaa));
});

test('qed: a fast zero that would need data writes fails with ENOTSUP and changes nothing', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'f.qed');
  await createQed(p, { sizeBytes: 4 * MiB });
  const dev = await openQedPath(p);
  t.after(() => dev.close());
  await dev.pwrite(Buffer.alloc(256 * 1024, 7), 0);
  await assert.rejects(dev.zero!(100, 65536, { fast: true }), (e: unknown) => e instanceof RequestError && e.errno === 'ENOTSUP');
  const buf = Buffer.alloc(256 * 1024);
  await dev.pread(buf, 0);
  assert.ok(buf.every((b) => b === 7));
  await dev.zero!(65536, 131072, { fast: true, mayTrim: true });
  await dev.pread(buf, 0);
  assert.ok(buf.subarray(0, 65536).every((b) => b === 7));
  assert.ok(buf.subarray(65536, 196608).every((b) => b === 0));
  assert.ok(buf.subarray(196608).every((b) => b === 7));
});

test('qed: status of a huge sparse image is answered per L2 span, not per cluster', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'huge.qed');
  // 2^50 bytes with 64 KiB clusters: 2^34 clusters, which a per-cluster walk could not finish.
  await createQed(p, { sizeBytes: 2 ** 50, tableSize: 16 });
  const dev = await openQedPath(p);
  t.after(() => dev.close());
  await dev.pwrite(Buffer.alloc(10, 1), 2 ** 49);
  assert.deepEqual(await dev.extents!(0, 2 ** 50), [
    { length: 2 ** 49, flags: EXTENT_HOLE | EXTENT_ZERO },
    { length: 65536, flags: 0 },
    { length: 2 ** 49 - 65536, flags: EXTENT_HOLE | EXTENT_ZERO },
  ]);
});

test('qed and vdi are in the default registry: probed by magic and opened', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'reg.qed');
  await createQed(p, { sizeBytes: MiB });
  assert.equal(probeFormat(await readProbeHead(p)), 'qed');
  const r = await openImageWithFormat(p, { readOnly: true });
  t.after(() => r.device.close());
  assert.equal(r.format, 'qed');
  assert.equal(r.probed, true);
  assert.equal(r.device.sizeBytes, MiB);
});

test('qed: concurrent writes into the same unallocated clusters all land, each cluster allocated once', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'c.qed');
  await createQed(p, { sizeBytes: 8 * MiB, clusterSize: 4096, tableSize: 2 });
  const dev = await openQedPath(p);
  const model = Buffer.alloc(8 * MiB);
  const jobs: Promise<void>[] = [];
  // 1 KiB pieces interleaved over 16 clusters in each of two L2 spans, all issued at once.
  for (let i = 0; i < 128; i++) {
    const span = i % 2;
    const off = span * 4 * MiB + (i >> 1) * 1024;
    const data = Buffer.alloc(1024, i + 1);
    data.copy(model, off);
    jobs.push(dev.pwrite(data, off));
  }
  await Promise.all(jobs);
  assert.ok((await readAll(dev)).equals(model));
  await dev.close();
  // Force the check on open: it reports what a duplicate or leak would look like.
  const img = readFileSync(p);
  img.writeBigUInt64LE(BigInt(QED_F.NEED_CHECK), 16);
  writeFileSync(p, img);
  const again = await openQedPath(p);
  t.after(() => again.close());
  assert.deepEqual([again.checkResult?.invalidEntries, again.checkResult?.duplicateReferences, again.checkResult?.leakedClusters], [0, 0, 0]);
  assert.equal(statSync(p).size, 4096 * (1 + 2 + 2 * 2 + 32));
  assert.ok((await readAll(again)).equals(model));
});

test('qed backing loops end with an error: onto itself, and through a qcow2 image', async (t) => {
  const dir = tempDir(t);
  const self = join(dir, 'self.qed');
  await createQed(self, { sizeBytes: MiB, backingFile: 'self.qed' });
  await assert.rejects(openQedPath(self, { readOnly: true }), (e: unknown) => e instanceof UnsupportedImageError && /loops back/.test(e.message));
  const a = join(dir, 'a.qed');
  await createQed(a, { sizeBytes: MiB, backingFile: 'b.qcow2', backingFormat: 'qcow2' });
  await createQcow2(join(dir, 'b.qcow2'), { sizeBytes: MiB, backingFile: 'a.qed', backingFormat: 'qed' });
  for (const top of [a, join(dir, 'b.qcow2')]) {
    await assert.rejects(openImageWithFormat(top, { readOnly: true }), (e: unknown) => e instanceof UnsupportedImageError && /loops back/.test(e.message));
  }
});

test('qed ignoreBacking: a missing backing file does not stop a resize', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'ib.qed');
  await createQed(p, { sizeBytes: MiB, backingFile: 'gone.raw', backingFormat: 'raw' });
  await assert.rejects(openQedPath(p, { readOnly: true }), /ENOENT|no such file/i);
  const dev = await openQedPath(p, { ignoreBacking: true });
  await dev.resize(2 * MiB);
  await dev.close();
  assert.equal(Number(readFileSync(p).readBigUInt64LE(48)), 2 * MiB);
  assert.equal(readFileSync(p).subarray(64, 72).toString('latin1'), 'gone.raw');
});

test('qed: zeroing a range that straddles two clusters without covering either zeroes both parts', async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'base.raw'), Buffer.alloc(MiB, 0xbb));
  const p = join(dir, 'straddle.qed');
  await createQed(p, { sizeBytes: MiB, backingFile: 'base.raw', backingFormat: 'raw' });
  const dev = await openQedPath(p);
  t.after(() => dev.close());
  await dev.zero!(0, 65536); // cluster 0: a zero cluster
  await dev.pwrite(Buffer.alloc(65536, 7), 65536); // cluster 1: data
  await dev.zero!(65536 - 100, 300);
  const buf = Buffer.alloc(3 * 65536);
  await dev.pread(buf, 0);
  assert.ok(buf.subarray(0, 65536 + 200).every((b) => b === 0));
  assert.ok(buf.subarray(65536 + 200, 2 * 65536).every((b) => b === 7));
  // And over an unallocated cluster that shows the backing file.
  await dev.zero!(2 * 65536 - 10, 20);
  await dev.pread(buf, 0);
  assert.ok(buf.subarray(2 * 65536 - 10, 2 * 65536 + 10).every((b) => b === 0));
  assert.ok(buf.subarray(2 * 65536 + 10).every((b) => b === 0xbb));
});
