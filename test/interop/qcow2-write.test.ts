// Random writes, write-zeroes and trims through the qcow2 driver, replayed by qemu-io on a twin
// image: `qemu-img compare` must find them equal and `qemu-img check` must find no errors and no
// leaks. Also covers overlays over a backing file, concurrent requests and driver-created images.

import assert from 'node:assert/strict';
import { copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { compressCluster } from '../../src/formats/qcow2/compress.js';
import { createQcow2, type Qcow2CreateOptions } from '../../src/formats/qcow2/create.js';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';
import { openQcow2Chain, prng, qemuCheck, qemuContent, readAll } from '../fixtures/qcow2/helpers.js';

const MiB = 1024 * 1024;

type Op = { kind: 'write'; off: number; len: number; pattern: number } | { kind: 'zero'; off: number; len: number; mayTrim: boolean } | { kind: 'trim'; off: number; len: number };

function randomOps(seed: number, count: number, sizeBytes: number, clusterSize: number): Op[] {
  const rnd = prng(seed);
  const ops: Op[] = [];
  for (let i = 0; i < count; i++) {
    // Log-uniform lengths from 1 byte to 4 MiB; half the requests aligned to the cluster size.
    let len = Math.max(1, Math.floor(2 ** (rnd() * 22)));
    let off = Math.floor(rnd() * sizeBytes);
    if (rnd() < 0.5) {
      off = Math.floor(off / clusterSize) * clusterSize;
      len = Math.max(clusterSize, Math.floor(len / clusterSize) * clusterSize);
    }
    len = Math.min(len, sizeBytes - off);
    if (len <= 0) continue;
    const r = rnd();
    if (r < 0.6) ops.push({ kind: 'write', off, len, pattern: 1 + Math.floor(rnd() * 254) });
    else if (r < 0.85) ops.push({ kind: 'zero', off, len, mayTrim: rnd() < 0.5 });
    else ops.push({ kind: 'trim', off, len });
  }
  return ops;
}

function qemuIoCommand(op: Op): string {
  switch (op.kind) {
    case 'write':
      return `write -P ${op.pattern} ${op.off} ${op.len}`;
    case 'zero':
      return `write -z ${op.mayTrim ? '-u ' : ''}${op.off} ${op.len}`;
    case 'trim':
      return `discard ${op.off} ${op.len}`;
  }
}

async function replay(path: string, ops: Op[]): Promise<void> {
  for (let i = 0; i < ops.length; i += 100) {
    await runOk('qemu-io', ['-f', 'qcow2', ...ops.slice(i, i + 100).flatMap((o) => ['-c', qemuIoCommand(o)]), path]);
  }
}

async function assertClean(path: string): Promise<void> {
  const chk = await qemuCheck(path);
  assert.equal(chk.code, 0, `qemu-img check ${path}: ${JSON.stringify(chk.json)}`);
  assert.equal(chk.json['check-errors'], 0);
  assert.equal(chk.json.leaks ?? 0, 0);
  assert.equal(chk.json.corruptions ?? 0, 0);
}

const configs: { name: string; opts: string; size: number; cluster: number; seed: number }[] = [
  { name: 'v3 64K clusters', opts: 'cluster_size=65536', size: 64 * MiB, cluster: 65536, seed: 1 },
  { name: 'v3 4K clusters', opts: 'cluster_size=4096', size: 32 * MiB, cluster: 4096, seed: 2 },
  { name: 'v2 (compat 0.10)', opts: 'compat=0.10,cluster_size=65536', size: 32 * MiB, cluster: 65536, seed: 3 },
  { name: 'extended L2 32K clusters', opts: 'extended_l2=on,cluster_size=32768', size: 32 * MiB, cluster: 32768, seed: 4 },
  { name: '512-byte clusters, refcount_bits=2', opts: 'cluster_size=512,refcount_bits=2', size: 2 * MiB, cluster: 512, seed: 5 },
  { name: 'lazy refcounts', opts: 'lazy_refcounts=on,cluster_size=65536', size: 32 * MiB, cluster: 65536, seed: 6 },
];

for (const c of configs) {
  test(`qcow2 write: 300 random requests on ${c.name} match qemu-io`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const mine = join(dir, 'mine.qcow2');
    const twin = join(dir, 'twin.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', c.opts, mine, String(c.size)]);
    copyFileSync(mine, twin);
    const ops = randomOps(c.seed, 300, c.size, c.cluster);
    const dev = await openQcow2Chain(mine);
    for (const op of ops) {
      if (op.kind === 'write') await dev.pwrite(Buffer.alloc(op.len, op.pattern), op.off);
      else if (op.kind === 'zero') await dev.zero!(op.off, op.len, { mayTrim: op.mayTrim });
      else await dev.trim!(op.off, op.len);
    }
    await dev.flush();
    await dev.close();
    await replay(twin, ops);
    const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', twin, mine]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    await assertClean(mine);
    // And the driver reads back what qemu-img sees.
    const again = await openQcow2Chain(mine, { readOnly: true });
    t.after(() => again.close());
    assert.ok((await readAll(again)).equals(await qemuContent(dir, mine)));
  });
}

for (const v of ['1.1', '0.10', 'extended_l2'] as const) {
  test(`qcow2 write: random requests on an overlay (${v}) over a backing file match qemu-io`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const base = join(dir, 'base.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(16 * MiB)]);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xaa 0 6M', '-c', 'write -P 0xbb 9M 3M', base]);
    const mine = join(dir, 'mine.qcow2');
    const twin = join(dir, 'twin.qcow2');
    // The overlay is larger than its backing file: the tail reads as zeros.
    const o = v === 'extended_l2' ? 'extended_l2=on,cluster_size=32768' : `compat=${v},cluster_size=16384`;
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', o, '-b', 'base.qcow2', '-F', 'qcow2', mine, String(20 * MiB)]);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', o, '-b', 'base.qcow2', '-F', 'qcow2', twin, String(20 * MiB)]);
    const ops = randomOps(v === '1.1' ? 21 : v === '0.10' ? 22 : 23, 250, 20 * MiB, v === 'extended_l2' ? 32768 : 16384);
    const dev = await openQcow2Chain(mine);
    for (const op of ops) {
      if (op.kind === 'write') await dev.pwrite(Buffer.alloc(op.len, op.pattern), op.off);
      else if (op.kind === 'zero') await dev.zero!(op.off, op.len, { mayTrim: op.mayTrim });
      else await dev.trim!(op.off, op.len);
    }
    await dev.close();
    await replay(twin, ops);
    const cmp = await run('qemu-img', ['compare', twin, mine]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    await assertClean(mine);
  });
}

test('qcow2 write: concurrent overlapping requests are serialised per cluster', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const img = join(dir, 'c.qcow2');
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, String(4 * MiB)]);
  const dev = await openQcow2Chain(img);
  const rnd = prng(99);
  const model = Buffer.alloc(4 * MiB);
  const inflight: Promise<void>[] = [];
  // Disjoint writes in flight together, then overlapping ones applied in issue order.
  for (let i = 0; i < 200; i++) {
    const off = Math.floor(rnd() * (4 * MiB - 20000));
    const len = 1 + Math.floor(rnd() * 20000);
    const pat = 1 + Math.floor(rnd() * 254);
    model.fill(pat, off, off + len);
    inflight.push(dev.pwrite(Buffer.alloc(len, pat), off));
  }
  await Promise.all(inflight);
  assert.ok((await readAll(dev)).equals(model));
  await dev.close();
  assert.ok((await qemuContent(dir, img)).equals(model));
  await assertClean(img);
});

const createCases: { name: string; opts: Qcow2CreateOptions; info: Record<string, unknown> }[] = [
  { name: 'v3 defaults', opts: { sizeBytes: 100 * MiB }, info: { 'cluster-size': 65536, compat: '1.1', 'refcount-bits': 16 } },
  { name: 'v2', opts: { sizeBytes: 10 * MiB, compat: '0.10', clusterSize: 4096 }, info: { 'cluster-size': 4096, compat: '0.10' } },
  { name: 'extended L2 + zstd + lazy refcounts', opts: { sizeBytes: 50 * MiB, extendedL2: true, compressionType: 'zstd', lazyRefcounts: true }, info: { 'extended-l2': true, 'compression-type': 'zstd', 'lazy-refcounts': true } },
  { name: '512-byte clusters, 1-bit refcounts, metadata preallocation', opts: { sizeBytes: 3 * MiB, clusterSize: 512, refcountBits: 1, preallocation: 'metadata' }, info: { 'cluster-size': 512, 'refcount-bits': 1 } },
  { name: '2M clusters, 64-bit refcounts', opts: { sizeBytes: 1024 * MiB + 512, clusterSize: 2 * MiB, refcountBits: 64 }, info: { 'cluster-size': 2 * MiB, 'refcount-bits': 64 } },
];

for (const c of createCases) {
  test(`qcow2 create: ${c.name} passes qemu-img check and info`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = join(dir, 'new.qcow2');
    await createQcow2(img, c.opts);
    await assertClean(img);
    const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', img])) as Record<string, unknown> & { 'format-specific': { data: Record<string, unknown> } };
    assert.equal(info.format, 'qcow2');
    assert.equal(info['virtual-size'], Math.ceil(c.opts.sizeBytes / 512) * 512);
    const merged: Record<string, unknown> = { ...info['format-specific'].data, 'cluster-size': info['cluster-size'] };
    for (const [k, v] of Object.entries(c.info)) assert.equal(merged[k], v, k);
    // Writes through the driver land where qemu-io reads them.
    const dev = await openQcow2Chain(img);
    await dev.pwrite(Buffer.alloc(70000, 0x5a), 1000);
    await dev.close();
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x5a 1000 70000', '-c', 'read -P 0 0 1000', img]);
    await assertClean(img);
  });
}

test('qcow2 create: an overlay with backing file and format reads through to its base', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const base = join(dir, 'base.qcow2');
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(4 * MiB)]);
  await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x31 0 4M', base]);
  const ov = join(dir, 'ov.qcow2');
  await createQcow2(ov, { sizeBytes: 4 * MiB, backingFile: 'base.qcow2', backingFormat: 'qcow2', clusterSize: 4096 });
  const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', ov])) as Record<string, unknown>;
  assert.equal(info['backing-filename'], 'base.qcow2');
  assert.equal(info['backing-filename-format'], 'qcow2');
  const dev = await openQcow2Chain(ov);
  await dev.pwrite(Buffer.alloc(100, 0x32), 5000);
  await dev.close();
  await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x31 0 5000', '-c', 'read -P 0x32 5000 100', '-c', 'read -P 0x31 5100 1000', ov]);
  await assertClean(ov);
});

// One reftable cluster of 512 bytes covers 64 refcount blocks: 2 MiB of host clusters with 64-bit
// refcounts, 8 MiB with 16-bit ones. Small writes make the grown table land inside the very block
// whose creation needed the growth.
const growth = [
  { bits: 64, chunk: 256 * 1024, bytes: 6 * MiB },
  { bits: 64, chunk: 4096, bytes: 6 * MiB },
  { bits: 16, chunk: 512, bytes: 12 * MiB },
];
for (const g of growth) {
  test(`qcow2 write: the refcount table grows (512-byte clusters, ${g.bits}-bit refcounts, ${g.chunk}-byte writes) and qemu-img agrees`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = join(dir, 'grow.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=512,refcount_bits=${g.bits}`, img, String(16 * MiB)]);
    const dev = await openQcow2Chain(img);
    const firstTable = dev.refcounts.reftableOffset;
    const pattern = (off: number): number => (off >> 16) & 0xff;
    for (let off = 0; off < g.bytes; off += g.chunk) await dev.pwrite(Buffer.alloc(g.chunk, pattern(off)), off);
    assert.notEqual(dev.refcounts.reftableOffset, firstTable, 'the refcount table moved');
    await dev.close();
    await assertClean(img);
    const twin = join(dir, 'twin.raw');
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', twin, String(16 * MiB)]);
    const cmds: string[] = [];
    // Every byte of a 64 KiB window got the same pattern, whatever the write size.
    const step = Math.max(g.chunk, 65536);
    for (let off = 0; off < g.bytes; off += step) cmds.push('-c', `write -P ${pattern(off)} ${off} ${step}`);
    await runOk('qemu-io', ['-f', 'raw', ...cmds, twin]);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', twin, img]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  });
}

for (const raw of [false, true]) {
  test(`qcow2 external data file${raw ? ' (data_file_raw)' : ''}: reads and random writes match qemu-io`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const mk = async (name: string): Promise<string> => {
      const img = join(dir, `${name}.qcow2`);
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, `${name}.data`)},data_file_raw=${raw ? 'on' : 'off'},cluster_size=16384`, img, String(16 * MiB)]);
      await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x44 0 100k', '-c', 'write -z 1M 64k', '-c', 'write -P 0x45 3M 5000', img]);
      return img;
    };
    const mine = await mk('mine');
    const twin = await mk('twin');
    const ro = await openQcow2Chain(mine, { readOnly: true });
    assert.ok((await readAll(ro)).equals(await qemuContent(dir, mine)));
    await ro.close();
    const ops = randomOps(raw ? 31 : 32, 200, 16 * MiB, 16384);
    const dev = await openQcow2Chain(mine);
    for (const op of ops) {
      if (op.kind === 'write') await dev.pwrite(Buffer.alloc(op.len, op.pattern), op.off);
      else if (op.kind === 'zero') await dev.zero!(op.off, op.len, { mayTrim: op.mayTrim });
      else await dev.trim!(op.off, op.len);
    }
    await dev.close();
    await replay(twin, ops);
    const cmp = await run('qemu-img', ['compare', twin, mine]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    await assertClean(mine);
  });
}

for (const cluster of [512, 65536]) {
  test(`qcow2 resize: growing a ${cluster}-byte-cluster image moves the L1 table; qemu-img agrees`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = join(dir, 'r.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, img, String(4 * MiB)]);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x12 4190208 4096', img]);
    const newSize = cluster === 512 ? 64 * MiB : 3 * 1024 * MiB;
    const dev = await openQcow2Chain(img);
    await dev.resize(newSize);
    assert.equal(dev.sizeBytes, newSize);
    await dev.pwrite(Buffer.alloc(5000, 0x13), newSize - 5000);
    await dev.close();
    const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', img])) as Record<string, unknown>;
    assert.equal(info['virtual-size'], newSize);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x11 0 1M', '-c', 'read -P 0x12 4190208 4096', '-c', `read -P 0 ${4 * MiB} 1M`, '-c', `read -P 0x13 ${newSize - 5000} 5000`, img]);
    await assertClean(img);
  });
}

/** `src` as a raw file compared with `img` by qemu-img; what qemu-img check reports of `img`, clean. */
async function compareAndCheck(dir: string, img: string, src: Buffer): Promise<Record<string, unknown>> {
  const raw = join(dir, 'src.raw');
  writeFileSync(raw, src);
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, img]);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  const chk = await qemuCheck(img);
  assert.equal(chk.code, 0, JSON.stringify(chk.json));
  return chk.json;
}

for (const ctype of ['zlib', 'zstd'] as const) {
  test(`qcow2 write: runs of clusters, compressed and plain mixed, each run one request (${ctype}), read back in qemu-img`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = join(dir, 'r.qcow2');
    const cs = 16384;
    // A short last cluster: the virtual size ends 4 KiB into it.
    const size = 64 * cs + 4096;
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs},compression_type=${ctype}`, img, String(size)]);
    // Clusters already allocated are replaced (and their old space released).
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x10 0 256k', img]);
    const src = Buffer.alloc(size);
    const rnd = prng(ctype === 'zlib' ? 51 : 52);
    const clusters = Math.ceil(size / cs);
    for (let c = 0; c < clusters; c++) {
      const chunk = src.subarray(c * cs, Math.min(size, (c + 1) * cs));
      if (c % 3 === 1) for (let i = 0; i < chunk.length; i++) chunk[i] = Math.floor(rnd() * 256);
      else for (let i = 0; i < chunk.length; i += 64) chunk.fill(Math.floor(rnd() * 4) + c, i, i + 64);
    }
    const type = ctype === 'zlib' ? 0 : 1;
    const dev = await openQcow2Chain(img);
    let compressed = 0;
    const runs: Promise<void>[] = [];
    for (let c = 0; c < clusters; c += 5) {
      const n = Math.min(5, clusters - c);
      const buf = src.subarray(c * cs, Math.min(size, (c + n) * cs));
      const packed: (Buffer | null)[] = [];
      for (let k = 0; k < n; k++) {
        const whole = Buffer.alloc(cs);
        buf.copy(whole, 0, k * cs, Math.min(buf.length, (k + 1) * cs));
        packed.push(await compressCluster(type, whole));
      }
      compressed += packed.filter((p) => p !== null).length;
      // Runs in flight together, as convert -c issues them.
      runs.push(dev.writeCompressedRun(buf, c * cs, packed));
    }
    await Promise.all(runs);
    await dev.close();
    const chk = await compareAndCheck(dir, img, src);
    // The whole random clusters did not shrink and went out plainly; every other one is compressed
    // (the last, 4 KiB of random data padded with zeros, too).
    let wholeRandom = 0;
    for (let c = 1; c < clusters - 1; c += 3) wholeRandom++;
    assert.equal(compressed, clusters - wholeRandom);
    assert.equal(Number(chk['compressed-clusters']), compressed, JSON.stringify(chk));
    assert.equal(Number(chk['allocated-clusters']), clusters, JSON.stringify(chk));
    await assertClean(img);
  });
}

for (const ctype of ['zlib', 'zstd'] as const) {
  test(`qcow2 write: compressed clusters (${ctype}) written by the driver read back in qemu-img`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = join(dir, 'c.qcow2');
    const cs = 16384;
    const size = 4 * MiB;
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs},compression_type=${ctype}`, img, String(size)]);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x10 0 1M', img]);
    // Compressible clusters of varied content, one incompressible, one all zeros.
    const src = Buffer.alloc(size);
    const rnd = prng(ctype === 'zlib' ? 41 : 42);
    for (let c = 0; c < size / cs; c++) {
      const chunk = src.subarray(c * cs, (c + 1) * cs);
      if (c === 7) for (let i = 0; i < cs; i++) chunk[i] = Math.floor(rnd() * 256);
      else if (c !== 9) for (let i = 0; i < cs; i += 64) chunk.fill(Math.floor(rnd() * 4) + c, i, i + 64);
    }
    const dev = await openQcow2Chain(img);
    for (let c = 0; c < size / cs; c++) await dev.writeCompressed(src.subarray(c * cs, (c + 1) * cs), c * cs);
    await dev.close();
    const chk = await compareAndCheck(dir, img, src);
    assert.ok(Number(chk['compressed-clusters']) > 200, JSON.stringify(chk));
    // Rewriting compressed clusters in place: partial writes, zeroes, trims.
    const dev2 = await openQcow2Chain(img);
    await dev2.pwrite(Buffer.alloc(1000, 0x99), 3 * cs + 100);
    await dev2.zero(10 * cs, 2 * cs);
    await dev2.trim(20 * cs, 3 * cs);
    await dev2.close();
    src.fill(0x99, 3 * cs + 100, 3 * cs + 1100);
    src.fill(0, 10 * cs, 12 * cs);
    src.fill(0, 20 * cs, 23 * cs);
    await compareAndCheck(dir, img, src);
    await assertClean(img);
  });
}
