// The qcow2 driver against an in-memory model: seeded random writes, zeroes, trims and reads
// (aligned and unaligned, 1 byte to 4 MiB) on images created by createQcow2, then the driver's
// own refcount check must find no leaks and no corruption.

import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../src/block/device.js';
import { RequestError } from '../../src/errors.js';
import { createQcow2, type Qcow2CreateOptions } from '../../src/formats/qcow2/create.js';
import { Qcow2Device } from '../../src/formats/qcow2/driver.js';
import { HostFile } from '../../src/io/host-file.js';
import { tempDir } from '../helpers/peers.js';
import { prng } from '../fixtures/qcow2/helpers.js';

const MiB = 1024 * 1024;

async function open(path: string, readOnly = false): Promise<Qcow2Device> {
  return Qcow2Device.open(await HostFile.open(path, { readOnly }));
}

const cases: { name: string; opts: Qcow2CreateOptions }[] = [
  { name: 'v3 64K', opts: { sizeBytes: 24 * MiB } },
  { name: 'v2 4K', opts: { sizeBytes: 12 * MiB, compat: '0.10', clusterSize: 4096 } },
  { name: 'extended L2 16K', opts: { sizeBytes: 12 * MiB, extendedL2: true, clusterSize: 16384 } },
  { name: '512-byte clusters, 4-bit refcounts', opts: { sizeBytes: 6 * MiB + 512, clusterSize: 512, refcountBits: 4 } },
  { name: '512-byte clusters, 64-bit refcounts (refcount table grows)', opts: { sizeBytes: 6 * MiB, clusterSize: 512, refcountBits: 64 } },
  { name: 'lazy refcounts, 64-bit refcounts', opts: { sizeBytes: 12 * MiB, lazyRefcounts: true, refcountBits: 64, clusterSize: 8192 } },
];

for (const c of cases) {
  test(`qcow2 driver: 300 random requests on ${c.name} read back like the model`, async (t) => {
    const path = join(tempDir(t), 'm.qcow2');
    await createQcow2(path, c.opts);
    const size = Math.ceil(c.opts.sizeBytes / 512) * 512;
    const cs = c.opts.clusterSize ?? 65536;
    const model = Buffer.alloc(size);
    const rnd = prng(size + cs);
    let dev = await open(path);
    let writtenNow = 0;
    for (let i = 0; i < 300; i++) {
      let len = Math.max(1, Math.floor(2 ** (rnd() * 22)));
      let off = Math.floor(rnd() * size);
      if (rnd() < 0.4) {
        off = Math.floor(off / cs) * cs;
        len = Math.max(cs, Math.floor(len / cs) * cs);
      }
      len = Math.min(len, size - off);
      const r = rnd();
      if (r < 0.5) {
        const data = Buffer.alloc(len);
        for (let j = 0; j < len; j += 4096) data.fill(Math.floor(rnd() * 256), j, Math.min(len, j + 4096));
        // Small writes try the synchronous path first, as the server does (BlockDevice.writeNow).
        if (len <= 65536 && rnd() < 0.5 && dev.writeNow(data, off)) writtenNow++;
        else await dev.pwrite(data, off, { fua: rnd() < 0.1 });
        data.copy(model, off);
      } else if (r < 0.7) {
        await dev.zero(off, len, { mayTrim: rnd() < 0.5 });
        model.fill(0, off, off + len);
      } else if (r < 0.8) {
        await dev.trim(off, len);
        // Whole clusters read as zeros after a discard; partial ones are left alone.
        const first = Math.ceil(off / cs) * cs;
        const end = off + len === size ? size : Math.floor((off + len) / cs) * cs;
        if (end > first) model.fill(0, first, end);
      } else {
        const b = Buffer.alloc(len);
        await dev.pread(b, off);
        assert.ok(b.equals(model.subarray(off, off + len)), `read ${i} [${off}, +${len}) differs from the model`);
      }
      if (i === 150) {
        await dev.close();
        dev = await open(path);
      }
    }
    const all = Buffer.alloc(size);
    await dev.pread(all, 0);
    assert.ok(all.equals(model));
    // Extents: every range reported as a hole reads as zeros in the model.
    let pos = 0;
    for (const x of await dev.extents(0, size)) {
      if (x.flags & EXTENT_ZERO) assert.ok(model.subarray(pos, pos + x.length).equals(Buffer.alloc(x.length)), `zero extent at ${pos} holds data`);
      pos += x.length;
    }
    assert.equal(pos, size);
    const chk = await dev.check();
    assert.deepEqual([chk.corruptions, chk.leaks], [0, 0], chk.messages.join('\n'));
    await dev.close();
    // Extended L2 entries are left to the ordinary path.
    if (c.opts.extendedL2 === true) assert.equal(writtenNow, 0);
    else assert.ok(writtenNow > 0, 'some writes were made here and now');
  });
}

test('qcow2 driver: concurrent writes, zeroes and reads on the same clusters are serialised', async (t) => {
  const path = join(tempDir(t), 'c.qcow2');
  await createQcow2(path, { sizeBytes: 2 * MiB, clusterSize: 4096 });
  const dev = await open(path);
  const model = Buffer.alloc(2 * MiB);
  // The first MiB allocated: writes there may go in place, here and now.
  await dev.pwrite(Buffer.alloc(MiB, 0x5a), 0);
  model.fill(0x5a, 0, MiB);
  const rnd = prng(5);
  const jobs: Promise<void>[] = [];
  let writtenNow = 0;
  for (let i = 0; i < 300; i++) {
    const off = Math.floor(rnd() * (2 * MiB - 9000));
    const len = 1 + Math.floor(rnd() * 9000);
    if (rnd() < 0.8) {
      const pat = Math.floor(rnd() * 256);
      model.fill(pat, off, off + len);
      // Made here and now only when no request before it holds or waits for its clusters.
      if (rnd() < 0.5 && dev.writeNow(Buffer.alloc(len, pat), off)) writtenNow++;
      else jobs.push(dev.pwrite(Buffer.alloc(len, pat), off));
    } else {
      model.fill(0, off, off + len);
      jobs.push(dev.zero(off, len, { mayTrim: true }));
    }
    // A read issued after a write to the same range sees it (FIFO per cluster).
    const snapshot = Buffer.from(model.subarray(off, off + len));
    const b = Buffer.alloc(len);
    jobs.push(dev.pread(b, off).then(() => assert.ok(b.equals(snapshot), `read ${i} saw another request's data`)));
  }
  await Promise.all(jobs);
  const all = Buffer.alloc(2 * MiB);
  await dev.pread(all, 0);
  assert.ok(all.equals(model));
  assert.ok(writtenNow > 0, 'some writes found their clusters free');
  const chk = await dev.check();
  assert.deepEqual([chk.corruptions, chk.leaks], [0, 0], chk.messages.join('\n'));
  await dev.close();
});

test('qcow2 driver: extents and zero semantics (mayTrim=false keeps the cluster, fast zero on v2 fails fast)', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'e.qcow2');
  await createQcow2(path, { sizeBytes: 1 * MiB, clusterSize: 65536 });
  const dev = await open(path);
  await dev.pwrite(Buffer.alloc(65536 * 2, 1), 0);
  await dev.zero(0, 65536, { mayTrim: false });
  assert.deepEqual(await dev.extents(0, 1 * MiB), [
    { length: 65536, flags: EXTENT_HOLE | EXTENT_ZERO },
    { length: 65536, flags: 0 },
    { length: 1 * MiB - 131072, flags: EXTENT_HOLE | EXTENT_ZERO },
  ]);
  assert.deepEqual(await dev.extents(0, 1 * MiB, { one: true }), [{ length: 65536, flags: EXTENT_HOLE | EXTENT_ZERO }]);
  // The preallocated zero cluster is reused in place by the next write: no new allocation.
  const before = (await dev.check()).imageEndOffset;
  await dev.pwrite(Buffer.alloc(10, 2), 100);
  assert.equal((await dev.check()).imageEndOffset, before);
  const b = Buffer.alloc(200);
  await dev.pread(b, 0);
  assert.ok(b.equals(Buffer.concat([Buffer.alloc(100), Buffer.alloc(10, 2), Buffer.alloc(90)])));
  assert.deepEqual(await dev.allocationDepth(0, 1 * MiB), [
    { length: 131072, depth: 1 },
    { length: 1 * MiB - 131072, depth: 0 },
  ]);
  await dev.close();

  const v2 = join(dir, 'v2.qcow2');
  await createQcow2(v2, { sizeBytes: 1 * MiB, compat: '0.10' });
  const d2 = await open(v2);
  await d2.pwrite(Buffer.alloc(65536, 3), 65536);
  await assert.rejects(d2.zero(65536, 65536, { fast: true }), (e: unknown) => e instanceof RequestError && e.errno === 'ENOTSUP');
  await d2.zero(65536, 65536, { mayTrim: false });
  const z = Buffer.alloc(65536, 9);
  await d2.pread(z, 65536);
  assert.ok(z.equals(Buffer.alloc(65536)));
  await d2.close();
});

test('qcow2 driver: read-only opens refuse writes; requests past the end are refused', async (t) => {
  const path = join(tempDir(t), 'ro.qcow2');
  await createQcow2(path, { sizeBytes: 1 * MiB });
  const dev = await open(path, true);
  assert.equal(dev.capabilities().writable, false);
  await assert.rejects(dev.pwrite(Buffer.alloc(1), 0), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM');
  await assert.rejects(dev.pread(Buffer.alloc(2), 1 * MiB - 1), (e: unknown) => e instanceof RequestError && e.errno === 'EINVAL');
  await dev.close();
});

test('qcow2 driver: check finds a leaked cluster and repairs it', async (t) => {
  const path = join(tempDir(t), 'leak.qcow2');
  await createQcow2(path, { sizeBytes: 4 * MiB, clusterSize: 4096 });
  const dev = await open(path);
  await dev.pwrite(Buffer.alloc(8192, 7), 0);
  // Raise a free cluster's refcount behind the driver's back: a leak.
  await dev.refcounts.set(200, 1);
  const found = await dev.check('none');
  assert.equal(found.leaks, 1);
  assert.equal(found.corruptions, 0);
  const fixed = await dev.check('leaks');
  assert.equal(fixed.leaksFixed, 1);
  assert.equal(fixed.leaks, 0);
  // Lower an in-use cluster's refcount: a corruption that `leaks` does not touch.
  const e = await dev.check();
  assert.equal(e.corruptions, 0);
  await dev.refcounts.set(0, 0);
  assert.equal((await dev.check('leaks')).corruptions, 1);
  const all = await dev.check('all');
  assert.equal(all.corruptionsFixed, 1);
  assert.equal(all.corruptions, 0);
  await dev.close();
});

test('qcow2 driver: check finds wrong COPIED flags and repairs them with mode all', async (t) => {
  const path = join(tempDir(t), 'copied.qcow2');
  await createQcow2(path, { sizeBytes: 4 * MiB, clusterSize: 4096 });
  const dev = await open(path);
  await dev.pwrite(Buffer.alloc(4096, 7), 0);
  // The L2 entry is read from the file below: metadata is written back on flush.
  await dev.flush();
  // A second reference to the data cluster (as a snapshot would add) without clearing COPIED.
  const l2 = dev.checkTarget().l1Offsets[0]!;
  const e = await dev.refcounts.get(l2 / 4096);
  assert.equal(e, 1);
  const hostCluster = Math.floor(Number((await readEntry(path, l2)) & ((1n << 56n) - 1n)) / 4096);
  await dev.refcounts.set(hostCluster, 2);
  // Like qemu-img check: a leak, and COPIED set on a cluster whose refcount is not 1.
  const found = await dev.check('none');
  assert.equal(found.leaks, 1);
  assert.equal(found.corruptions, 1);
  assert.match(found.messages.join('\n'), /OFLAG_COPIED data cluster/);
  await dev.refcounts.set(hostCluster, 1);
  await dev.close();
  // Clear COPIED on the L2 entry behind the driver's back.
  const raw = await readEntry(path, l2);
  await writeEntry(path, l2, raw & ~(1n << 63n));
  const dev2 = await open(path);
  assert.equal((await dev2.check('none')).corruptions, 1);
  const fixed = await dev2.check('all');
  assert.equal(fixed.corruptionsFixed, 1);
  assert.equal((await dev2.check('none')).corruptions, 0);
  await dev2.close();
  assert.equal((await readEntry(path, l2)) >> 63n, 1n);
});

async function readEntry(path: string, offset: number): Promise<bigint> {
  const f = await HostFile.open(path, { readOnly: true });
  const b = Buffer.alloc(8);
  await f.pread(b, offset);
  await f.close();
  return b.readBigUInt64BE(0);
}

async function writeEntry(path: string, offset: number, v: bigint): Promise<void> {
  const f = await HostFile.open(path);
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  await f.pwrite(b, offset);
  await f.close();
}

test('qcow2 driver: concurrent mixed requests on an extended-L2 overlay over a backing image', async (t) => {
  const dir = tempDir(t);
  const base = join(dir, 'base.qcow2');
  await createQcow2(base, { sizeBytes: 3 * MiB, clusterSize: 4096 });
  const model = Buffer.alloc(4 * MiB);
  const b = await open(base);
  const rnd = prng(77);
  for (let off = 0; off < 3 * MiB; off += 4096) model.fill(Math.floor(rnd() * 255) + 1, off, off + 4096);
  await b.pwrite(model.subarray(0, 3 * MiB), 0);
  await b.close();
  const top = join(dir, 'top.qcow2');
  await createQcow2(top, { sizeBytes: 4 * MiB, clusterSize: 32768, extendedL2: true, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
  const dev = await Qcow2Device.open(await HostFile.open(top), { openBacking: async (ref) => open(ref.path, true) });
  const jobs: Promise<void>[] = [];
  for (let i = 0; i < 400; i++) {
    const off = Math.floor(rnd() * (4 * MiB - 70000));
    const len = 1 + Math.floor(rnd() * 70000);
    const r = rnd();
    if (r < 0.6) {
      const pat = Math.floor(rnd() * 256);
      model.fill(pat, off, off + len);
      jobs.push(dev.pwrite(Buffer.alloc(len, pat), off));
    } else if (r < 0.8) {
      model.fill(0, off, off + len);
      jobs.push(dev.zero(off, len, { mayTrim: rnd() < 0.5 }));
    } else {
      const snapshot = Buffer.from(model.subarray(off, off + len));
      const got = Buffer.alloc(len);
      jobs.push(dev.pread(got, off).then(() => assert.ok(got.equals(snapshot), `read ${i} [${off}, +${len}) differs`)));
    }
  }
  await Promise.all(jobs);
  const all = Buffer.alloc(4 * MiB);
  await dev.pread(all, 0);
  assert.ok(all.equals(model));
  const chk = await dev.check();
  assert.deepEqual([chk.corruptions, chk.leaks], [0, 0], chk.messages.join('\n'));
  await dev.close();
});

test('qcow2 driver: a small write to a never-written cluster writes its bytes only; a reused cluster is padded with zeros', async (t) => {
  const path = join(tempDir(t), 'fresh.qcow2');
  const CS = 65536;
  await createQcow2(path, { sizeBytes: 8 * MiB });
  const dev = await open(path);
  const small = Buffer.alloc(4096, 0xaa);
  for (let c = 8; c < 24; c++) await dev.pwrite(small, c * CS + 4096);
  await dev.flush();
  const { size, blocks } = statSync(path);
  // Sixteen clusters with 4 KiB of data each: most of their 60 KiB of padding was never written.
  assert.ok(blocks * 512 <= size - 8 * CS, `${blocks * 512} bytes allocated of ${size}`);

  // A cluster that held data, freed by a discard and handed out again, still reads zeros around a write.
  await dev.pwrite(Buffer.alloc(CS, 0x55), 0);
  const freed = dev.hostRun(0, CS)!.offset;
  await dev.trim(0, CS);
  await dev.flush();
  await dev.pwrite(small, 30 * CS + 4096);
  assert.equal(dev.hostRun(30 * CS + 4096, 4096)!.offset, freed + 4096, 'the freed cluster is reused');
  const back = Buffer.alloc(CS);
  await dev.pread(back, 30 * CS);
  const want = Buffer.alloc(CS);
  small.copy(want, 4096);
  assert.ok(back.equals(want));
  for (let c = 8; c < 24; c++) {
    await dev.pread(back, c * CS);
    assert.ok(back.equals(want), `cluster ${c}`);
  }
  const chk = await dev.check();
  assert.deepEqual([chk.corruptions, chk.leaks], [0, 0], chk.messages.join('\n'));
  await dev.close();
});
