// Images written by qemu-img/qemu-io read back byte-for-byte through the qcow2 driver, and its
// extents agree with `qemu-img map` on which ranges hold data.

import assert from 'node:assert/strict';
import { copyFileSync, openSync, readFileSync, readSync, closeSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { EXTENT_HOLE, EXTENT_ZERO, type BlockDevice } from '../../src/block/device.js';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';
import { openQcow2Chain, prng, qemuCheck, qemuContent, qemuMap, readAll } from '../fixtures/qcow2/helpers.js';

const MiB = 1024 * 1024;

/** A deterministic mix of data, zero and discarded ranges, written by qemu-io. */
function qemuIoScript(sizeBytes: number, clusterSize: number, seed: number): string[] {
  const rnd = prng(seed);
  const cmds: string[] = [];
  for (let i = 0; i < 24; i++) {
    const len = Math.max(512, Math.floor(rnd() * Math.min(3 * clusterSize, sizeBytes / 8) / 512) * 512);
    const off = Math.floor((rnd() * (sizeBytes - len)) / 512) * 512;
    const r = rnd();
    if (r < 0.6) cmds.push(`write -P ${1 + Math.floor(rnd() * 254)} ${off} ${len}`);
    else if (r < 0.8) cmds.push(`write -z ${off} ${len}`);
    else cmds.push(`discard ${off} ${len}`);
  }
  return cmds;
}

async function qemuIo(path: string, cmds: string[], fmt = 'qcow2'): Promise<void> {
  await runOk('qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), path]);
}

/** Compare extents with qemu-img map at 512-byte granularity. */
async function assertExtentsMatch(dev: BlockDevice, path: string): Promise<void> {
  const sectors = Math.ceil(dev.sizeBytes / 512);
  const qData = new Uint8Array(sectors);
  const qZero = new Uint8Array(sectors);
  for (const e of await qemuMap(path)) {
    for (let s = e.start / 512; s < (e.start + e.length) / 512; s++) {
      qData[s] = e.data ? 1 : 0;
      qZero[s] = e.zero ? 1 : 0;
    }
  }
  let pos = 0;
  const exts = await dev.extents!(0, dev.sizeBytes);
  for (const x of exts) {
    for (let s = pos / 512; s < (pos + x.length) / 512; s++) {
      const isData = (x.flags & EXTENT_HOLE) === 0;
      assert.equal(isData, qData[s] === 1, `sector ${s}: data=${isData}, qemu-img map says ${qData[s] === 1}`);
      if (!isData) assert.equal((x.flags & EXTENT_ZERO) !== 0, qZero[s] === 1, `sector ${s}: zero flag disagrees with qemu-img map`);
    }
    pos += x.length;
  }
  assert.equal(pos, dev.sizeBytes);
}

async function assertReadsLikeQemu(t: TestContext, dir: string, path: string): Promise<void> {
  const dev = await openQcow2Chain(path, { readOnly: true });
  t.after(() => dev.close());
  const ref = await qemuContent(dir, path);
  const mine = await readAll(dev, 3 * 65536 + 512);
  assert.ok(mine.equals(ref), 'driver content differs from qemu-img convert');
  // Unaligned small reads cross cluster and subcluster boundaries.
  const rnd = prng(7);
  for (let i = 0; i < 50; i++) {
    const len = 1 + Math.floor(rnd() * 70000);
    const off = Math.floor(rnd() * (dev.sizeBytes - len));
    const b = Buffer.alloc(len);
    await dev.pread(b, off);
    assert.ok(b.equals(ref.subarray(off, off + len)), `read [${off}, +${len}) differs`);
  }
  await assertExtentsMatch(dev, path);
  // check() reports the statistics qemu-img check does.
  const mine2 = await dev.check();
  const q = (await qemuCheck(path)).json;
  assert.deepEqual(
    [mine2.imageEndOffset, mine2.totalClusters, mine2.allocatedClusters, mine2.fragmentedClusters, mine2.compressedClusters, mine2.leaks],
    [q['image-end-offset'], q['total-clusters'], q['allocated-clusters'], q['fragmented-clusters'] ?? 0, q['compressed-clusters'] ?? 0, q.leaks ?? 0],
    'check statistics differ from qemu-img check',
  );
}

const layouts: { name: string; opts: string; size: number; cluster: number }[] = [
  { name: 'compat 0.10, 64K clusters', opts: 'compat=0.10', size: 16 * MiB, cluster: 65536 },
  { name: 'compat 1.1, 512-byte clusters', opts: 'compat=1.1,cluster_size=512', size: 4 * MiB, cluster: 512 },
  { name: 'compat 1.1, 4K clusters', opts: 'cluster_size=4096', size: 8 * MiB, cluster: 4096 },
  { name: 'compat 1.1, 64K clusters', opts: 'cluster_size=65536', size: 16 * MiB, cluster: 65536 },
  { name: 'compat 1.1, 2M clusters', opts: 'cluster_size=2097152', size: 32 * MiB, cluster: 2 * MiB },
  { name: 'extended L2, 64K clusters', opts: 'extended_l2=on,cluster_size=65536', size: 16 * MiB, cluster: 65536 },
  { name: 'extended L2, 16K clusters', opts: 'extended_l2=on,cluster_size=16384', size: 8 * MiB, cluster: 16384 },
  { name: 'refcount_bits=1', opts: 'refcount_bits=1,cluster_size=4096', size: 4 * MiB, cluster: 4096 },
  { name: 'refcount_bits=64', opts: 'refcount_bits=64', size: 8 * MiB, cluster: 65536 },
];

for (const l of layouts) {
  test(`qcow2 read: ${l.name} matches qemu-img`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = join(dir, 'a.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', l.opts, img, String(l.size)]);
    await qemuIo(img, qemuIoScript(l.size, l.cluster, l.size + l.cluster));
    await assertReadsLikeQemu(t, dir, img);
  });
}

for (const ctype of ['zlib', 'zstd'] as const) {
  test(`qcow2 read: compressed clusters (${ctype}) match qemu-img`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const src = join(dir, 'src.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(8 * MiB)]);
    // Compressible but varied content, plus one incompressible cluster.
    await qemuIo(src, ['write -P 0x11 0 1M', 'write -P 0x22 1500k 700k', 'write -z 3M 64k', 'write -P 0x33 5M 12345']);
    const rndData = Buffer.alloc(65536);
    const r = prng(3);
    for (let i = 0; i < rndData.length; i++) rndData[i] = Math.floor(r() * 256);
    const rawPart = join(dir, 'rand.bin');
    writeFileSync(rawPart, rndData);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', `write -s ${rawPart} 6M 64k`, src]);
    const img = join(dir, 'c.qcow2');
    await runOk('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', `compression_type=${ctype}`, src, img]);
    const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', img])) as { 'format-specific': { data: { 'compression-type': string } } };
    assert.equal(info['format-specific'].data['compression-type'], ctype);
    await assertReadsLikeQemu(t, dir, img);
    // Partial overwrites of compressed clusters rewrite them as normal clusters.
    const dev = await openQcow2Chain(img);
    await dev.pwrite(Buffer.alloc(1000, 0x77), 70000);
    await dev.pwrite(Buffer.alloc(512, 0x78), 6 * MiB + 100);
    await dev.close();
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 70000 1000', '-c', `write -P 0x78 ${6 * MiB + 100} 512`, src]);
    const cmp = await run('qemu-img', ['compare', src, img]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    const chk = await qemuCheck(img);
    assert.equal(chk.code, 0, JSON.stringify(chk.json));
  });
}

test('qcow2 read: a three-level backing chain and a raw-backed overlay', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const base = join(dir, 'base.qcow2');
  const mid = join(dir, 'mid.qcow2');
  const top = join(dir, 'top.qcow2');
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(6 * MiB)]);
  await qemuIo(base, ['write -P 0x61 0 3M', 'write -P 0x62 5M 1M']);
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', mid, String(8 * MiB)]);
  await qemuIo(mid, ['write -P 0x63 1M 100k', 'write -z 2M 64k', 'write -P 0x64 7M 4k']);
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', mid, '-F', 'qcow2', '-o', 'cluster_size=4096', top, String(10 * MiB)]);
  await qemuIo(top, ['write -P 0x65 1000 3000', 'discard 5M 64k', 'write -P 0x66 9M 4k']);
  await assertReadsLikeQemu(t, dir, top);
  const dev = await openQcow2Chain(top, { readOnly: true });
  t.after(() => dev.close());
  const depth = await dev.allocationDepth!(0, dev.sizeBytes);
  // Sector 0 is in top (depth 1); 1M in mid (2); 4M only in base... base has no data at 4M.
  const depthAt = (off: number): number => {
    let p = 0;
    for (const d of depth) {
      if (off < p + d.length) return d.depth;
      p += d.length;
    }
    return -1;
  };
  assert.equal(depthAt(0), 1);
  assert.equal(depthAt(1 * MiB), 2);
  assert.equal(depthAt(100 * 1024), 3);
  assert.equal(depthAt(4 * MiB), 0);
  assert.equal(depthAt(9.5 * MiB), 0);

  const rawBase = join(dir, 'base.raw');
  const rnd = prng(11);
  const rb = Buffer.alloc(3 * MiB);
  for (let i = 0; i < rb.length; i++) rb[i] = Math.floor(rnd() * 256);
  writeFileSync(rawBase, rb);
  const ov = join(dir, 'ov.qcow2');
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', ov, String(4 * MiB)]);
  await qemuIo(ov, ['write -P 0x67 64k 10k']);
  await assertReadsLikeQemu(t, dir, ov);
});

test('qcow2 read: an image with an internal snapshot lists it and reads the active state', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const img = join(dir, 's.qcow2');
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(8 * MiB)]);
  await qemuIo(img, ['write -P 0x41 0 1M']);
  await runOk('qemu-img', ['snapshot', '-c', 'first', img]);
  await qemuIo(img, ['write -P 0x42 512k 1M', 'discard 0 64k']);
  await runOk('qemu-img', ['snapshot', '-c', 'second', img]);
  await assertReadsLikeQemu(t, dir, img);
  const dev = await openQcow2Chain(img);
  assert.deepEqual(dev.snapshots.map((s) => [s.id, s.name, s.diskSizeBytes]), [['1', 'first', 8 * MiB], ['2', 'second', 8 * MiB]]);
  // Writes after a snapshot copy shared clusters instead of changing the snapshot.
  await dev.pwrite(Buffer.alloc(4096, 0x43), 4096);
  await dev.trim(128 * 1024, 64 * 1024);
  await dev.close();
  const chk = await qemuCheck(img);
  assert.equal(chk.code, 0, JSON.stringify(chk.json));
  const snapRaw = join(dir, 'first.raw');
  await runOk('qemu-img', ['convert', '-O', 'raw', '-l', 'snapshot.name=first', img, snapRaw]);
  const first = Buffer.alloc(2 * MiB);
  const fd = openSync(snapRaw, 'r');
  readSync(fd, first, 0, first.length, 0);
  closeSync(fd);
  assert.ok(first.subarray(0, MiB).equals(Buffer.alloc(MiB, 0x41)));
  assert.ok(first.subarray(MiB).equals(Buffer.alloc(MiB)));
  // Each snapshot served read-only reads like qemu-img's view of it.
  for (const [sel, name] of [['first', 'first'], ['2', 'second']]) {
    const snapDev = await openQcow2Chain(img, { snapshot: sel });
    assert.equal(snapDev.capabilities().writable, false);
    const out = join(dir, `${name}-full.raw`);
    await runOk('qemu-img', ['convert', '-O', 'raw', '-l', `snapshot.name=${name}`, img, out]);
    assert.ok((await readAll(snapDev)).equals(readFileSync(out)), `snapshot ${sel}`);
    await snapDev.close();
  }
  await assert.rejects(openQcow2Chain(img, { snapshot: 'nope', readOnly: true }), /no snapshot "nope"/);
});

test('qcow2 read: lazy refcounts left dirty by a killed qemu-io are read, then repaired on a writable open', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const img = join(dir, 'lazy.qcow2');
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4096', img, String(8 * MiB)]);
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x51 0 300k', '-c', 'write -P 0x52 5M 8k', '-c', 'sigraise 9', img]);
  const hdr = Buffer.alloc(8);
  const fd = openSync(img, 'r');
  readSync(fd, hdr, 0, 8, 72);
  closeSync(fd);
  assert.equal(hdr.readBigUInt64BE(0) & 1n, 1n, 'qemu-io left the dirty bit set');
  const before = await qemuCheck(img);
  assert.notEqual(before.code, 0, 'refcounts are stale before repair');
  await assertReadsLikeQemu(t, dir, img);
  const dev = await openQcow2Chain(img);
  await dev.pwrite(Buffer.alloc(5000, 0x53), 6 * MiB);
  await dev.close();
  const after = await qemuCheck(img);
  assert.equal(after.code, 0, JSON.stringify(after.json));
  const fd2 = openSync(img, 'r');
  readSync(fd2, hdr, 0, 8, 72);
  closeSync(fd2);
  assert.equal(hdr.readBigUInt64BE(0) & 1n, 0n, 'dirty bit cleared after a clean close');
  const copy = join(dir, 'lazy-copy.qcow2');
  copyFileSync(img, copy);
  await assertReadsLikeQemu(t, dir, copy);
});

test('qcow2: bitmaps extension is counted while valid, preserved untouched, and its autoclear bit cleared on a writable open', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const img = join(dir, 'bm.qcow2');
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(8 * MiB)]);
  await runOk('qemu-img', ['bitmap', '--add', img, 'b0']);
  await qemuIo(img, ['write -P 0x21 0 2M', 'write -P 0x22 6M 64k']);
  const hdr = (): Buffer => {
    const b = Buffer.alloc(65536);
    const fd = openSync(img, 'r');
    readSync(fd, b, 0, b.length, 0);
    closeSync(fd);
    return b;
  };
  const before = hdr();
  assert.equal(before.readBigUInt64BE(88) & 1n, 1n);
  // Unknown autoclear bits are cleared too.
  const poked = Buffer.alloc(8);
  poked.writeBigUInt64BE(before.readBigUInt64BE(88) | (1n << 20n));
  const fdw = openSync(img, 'r+');
  writeSync(fdw, poked, 0, 8, 88);
  closeSync(fdw);
  // Read-only: the bitmap clusters are accounted for, so our check finds nothing.
  const ro = await openQcow2Chain(img, { readOnly: true });
  const roCheck = await ro.check();
  assert.deepEqual([roCheck.leaks, roCheck.corruptions], [0, 0], roCheck.messages.join('\n'));
  await ro.close();
  assert.equal(hdr().readBigUInt64BE(88), before.readBigUInt64BE(88) | (1n << 20n), 'a read-only open changes nothing');
  const rw = await openQcow2Chain(img);
  await rw.pwrite(Buffer.alloc(512, 0x23), 3 * MiB);
  await rw.close();
  const after = hdr();
  assert.equal(after.readBigUInt64BE(88), 0n, 'autoclear bits cleared');
  // The extension area (everything past the autoclear field) is byte-identical.
  assert.ok(after.subarray(96, 4096).equals(before.subarray(96, 4096)), 'header extensions untouched');
  // QEMU now treats the bitmaps as inconsistent: at worst leaks, never corruption.
  const chk = await qemuCheck(img);
  assert.equal(chk.json['check-errors'], 0);
  assert.equal(chk.json.corruptions ?? 0, 0, JSON.stringify(chk.json));
  await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x23 3M 512', '-c', 'read -P 0x21 0 2M', img]);
});

test('qcow2: the default format registry probes qcow2 and opens its backing chain', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const { openImageWithFormat } = await import('../../src/formats/open.js');
  const dir = tempDir(t);
  const base = join(dir, 'base.raw');
  await runOk('qemu-img', ['create', '-q', '-f', 'raw', base, String(2 * MiB)]);
  await qemuIo(base, ['write -P 0x71 0 2M'], 'raw');
  const top = join(dir, 'top.qcow2');
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', top, String(4 * MiB)]);
  await qemuIo(top, ['write -P 0x72 1M 4k']);
  const r = await openImageWithFormat(top, { readOnly: true });
  t.after(() => r.device.close());
  assert.equal(r.format, 'qcow2');
  assert.ok((await readAll(r.device)).equals(await qemuContent(dir, top)));
});

test('qcow2: describeQcow2 matches qemu-img info (format-specific data, dirty flag, snapshots)', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const { describeQcow2 } = await import('../../src/formats/qcow2/info.js');
  const dir = tempDir(t);
  const variants = ['compat=0.10', 'lazy_refcounts=on,extended_l2=on,compression_type=zstd', `data_file=${join(dir, 'd.data')},data_file_raw=on`, 'refcount_bits=4'];
  for (const [i, o] of variants.entries()) {
    const img = join(dir, `i${i}.qcow2`);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', o, img, String(8 * MiB)]);
    if (!o.includes('data_file')) await runOk('qemu-img', ['snapshot', '-c', `snap${i}`, img]);
    const q = JSON.parse(await runOk('qemu-img', ['info', '--output=json', img])) as Record<string, unknown>;
    const dev = await openQcow2Chain(img, { readOnly: true });
    const mine = describeQcow2(dev.header, dev.snapshots);
    await dev.close();
    assert.deepEqual(mine.formatSpecific, q['format-specific'], o);
    assert.equal(mine.dirtyFlag, q['dirty-flag']);
    assert.deepEqual(mine.snapshots.map((s) => [s.id, s.name, s['date-sec'], s['vm-state-size']]), ((q.snapshots as Record<string, unknown>[] | undefined) ?? []).map((s) => [s.id, s.name, s['date-sec'], s['vm-state-size']]));
  }
});
