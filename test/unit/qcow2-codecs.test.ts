// qcow2 codecs against bytes built by hand: the header (hex golden and one-field mutations),
// L1/L2 entries, refcount entries of every width, zstd frame measurement, the table cache and
// the cluster range lock.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CorruptImageError, UnsupportedImageError } from '../../src/errors.js';
import { decodeQcow2Header, encodeQcow2Header, QCOW2_INCOMPAT } from '../../src/formats/qcow2/header.js';
import { decodeL1Entry, decodeL2Entry, encodeL2Entry, makeGeometry, subclusterMask } from '../../src/formats/qcow2/map.js';
import { decodeReftable, readRefcountEntry, writeRefcountEntry } from '../../src/formats/qcow2/refcount.js';
import { compressCluster, decompressCluster, measureZstdFrame } from '../../src/formats/qcow2/compress.js';
import { TableCache } from '../../src/formats/qcow2/l2-cache.js';
import { RangeLock } from '../../src/formats/qcow2/locks.js';
import { randomBytes } from 'node:crypto';
import * as zstdWasm from '@bokuweb/zstd-wasm';
import { loadNativeZstd } from '../../src/sys/zstd.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

/** A version 3 header, 64 KiB clusters, 16 MiB, lazy refcounts, raw backing "base.img". */
function goldenHeader(): Buffer {
  const fixed = hex(`
    514649fb 00000003 0000000000000090 00000008 00000010 0000000001000000
    00000000 00000001 0000000000030000 0000000000010000 00000001 00000000 0000000000000000
    0000000000000000 0000000000000001 0000000000000000 00000004 00000070
    00 00000000000000
    e2792aca 00000003 726177 0000000000
    0000000000000000`);
  const buf = Buffer.alloc(65536);
  fixed.copy(buf);
  buf.write('base.img', 0x90, 'latin1');
  return buf;
}
const FILE_SIZE = 0x40000;

test('qcow2 header: decodes a hand-built v3 header', () => {
  const h = decodeQcow2Header(goldenHeader(), FILE_SIZE);
  assert.equal(h.version, 3);
  assert.equal(h.clusterBits, 16);
  assert.equal(h.sizeBytes, 16 * 1024 * 1024);
  assert.equal(h.l1Size, 1);
  assert.equal(h.l1TableOffset, 0x30000);
  assert.equal(h.refcountTableOffset, 0x10000);
  assert.equal(h.refcountTableClusters, 1);
  assert.equal(h.compatibleFeatures, 1n);
  assert.equal(h.refcountOrder, 4);
  assert.equal(h.headerLength, 112);
  assert.equal(h.backingFile, 'base.img');
  assert.equal(h.backingFormat, 'raw');
  assert.equal(h.extensions.length, 1);
});

test('qcow2 header: the encoder produces the same fields at the same offsets', () => {
  const enc = encodeQcow2Header({
    version: 3, clusterBits: 16, sizeBytes: 16 * 1024 * 1024, l1Size: 1, l1TableOffset: 0x30000,
    refcountTableOffset: 0x10000, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0,
    incompatibleFeatures: 0n, compatibleFeatures: 1n, autoclearFeatures: 0n, refcountOrder: 4, compressionType: 0,
    backingFile: 'base.img', backingFormat: 'raw', dataFile: null,
  });
  const gold = goldenHeader();
  // Everything up to the extensions is identical (the encoder adds a feature name table after).
  assert.ok(enc.subarray(8, 0x70).equals(gold.subarray(8, 0x70)) || enc.subarray(16, 0x70).equals(gold.subarray(16, 0x70)));
  assert.ok(enc.subarray(0x70, 0x70 + 16).equals(gold.subarray(0x70, 0x70 + 16)));
  const back = decodeQcow2Header(enc, FILE_SIZE);
  assert.equal(back.backingFile, 'base.img');
  assert.equal(back.backingFormat, 'raw');
  assert.deepEqual(back.featureNames.find((f) => f.type === 1 && f.bit === 0)?.name, 'lazy refcounts');
});

type Mut = [string, (b: Buffer) => void, typeof CorruptImageError | typeof UnsupportedImageError, string];
const mutations: Mut[] = [
  ['version 4', (b) => b.writeUInt32BE(4, 4), UnsupportedImageError, 'qcow2 header: unsupported version 4'],
  ['cluster_bits 8', (b) => b.writeUInt32BE(8, 20), CorruptImageError, 'qcow2 header: cluster_bits 8 is outside 9..21'],
  ['cluster_bits 22', (b) => b.writeUInt32BE(22, 20), CorruptImageError, 'qcow2 header: cluster_bits 22 is outside 9..21'],
  ['refcount_order 7', (b) => b.writeUInt32BE(7, 96), CorruptImageError, 'qcow2 header: refcount_order 7 is above 6'],
  ['header_length 100', (b) => b.writeUInt32BE(100, 100), CorruptImageError, 'qcow2 header: header_length 100 is invalid'],
  ['header_length 108', (b) => b.writeUInt32BE(108, 100), CorruptImageError, 'qcow2 header: header_length 108 is invalid'],
  ['size above 2^53', (b) => b.writeBigUInt64BE(1n << 60n, 24), CorruptImageError, `qcow2 header: size ${1n << 60n} is out of range`],
  ['l1 unaligned', (b) => b.writeBigUInt64BE(0x30200n, 40), CorruptImageError, 'qcow2 header: L1 table offset 197120 is not cluster aligned'],
  ['l1 overlaps reftable', (b) => b.writeBigUInt64BE(0x10000n, 40), CorruptImageError, 'qcow2 header: L1 table overlaps the refcount table'],
  ['reftable 9 MiB', (b) => b.writeUInt32BE(144, 56), CorruptImageError, 'qcow2 header: refcount table of 144 clusters is above the 8388608-byte limit'],
  ['65537 snapshots', (b) => b.writeUInt32BE(65537, 60), CorruptImageError, 'qcow2 header: nb_snapshots 65537 is above 65536'],
  ['compression bit without type', (b) => b.writeBigUInt64BE(QCOW2_INCOMPAT.COMPRESSION, 72), CorruptImageError, 'qcow2 header: compression_type 0 disagrees with the compression type feature bit'],
  ['compression type 2', (b) => {
    b.writeBigUInt64BE(QCOW2_INCOMPAT.COMPRESSION, 72);
    b[104] = 2;
  }, UnsupportedImageError, 'qcow2: unknown compression_type 2'],
  ['extended L2 with 4K clusters', (b) => {
    b.writeBigUInt64BE(QCOW2_INCOMPAT.EXTL2, 72);
    b.writeUInt32BE(12, 20);
  }, CorruptImageError, 'qcow2 header: extended L2 entries need cluster_bits >= 14, not 12'],
  ['AES', (b) => b.writeUInt32BE(1, 32), UnsupportedImageError, 'qcow2: encryption (crypt_method 1, AES) is not supported'],
  ['unknown incompatible bit 63', (b) => b.writeBigUInt64BE(1n << 63n, 72), UnsupportedImageError, 'qcow2: unsupported incompatible feature bit 63'],
  ['raw data bit without data file', (b) => b.writeBigUInt64BE(2n, 88), CorruptImageError, 'qcow2 header: raw external data bit set without an external data file'],
  ['duplicate extension', (b) => hex('e2792aca 00000003 726177 0000000000').copy(b, 0x80), CorruptImageError, 'qcow2 header: extension 0xe2792aca appears twice'],
  ['backing name 1024 bytes', (b) => b.writeUInt32BE(1024, 16), CorruptImageError, 'qcow2 header: backing file name length 1024 is above 1023'],
  ['backing name inside the header', (b) => b.writeBigUInt64BE(0x10n, 8), CorruptImageError, 'qcow2 header: backing file name overlaps the header'],
];

for (const [name, mutate, cls, message] of mutations) {
  test(`qcow2 header: ${name} is refused`, () => {
    const b = goldenHeader();
    mutate(b);
    assert.throws(() => decodeQcow2Header(b, FILE_SIZE), (e: unknown) => e instanceof cls && (e as Error).message === message);
  });
}

test('qcow2 header: every truncation of the fixed header is refused, never read past', () => {
  const b = goldenHeader();
  for (let n = 0; n < 0x70; n++) assert.throws(() => decodeQcow2Header(b.subarray(0, n), FILE_SIZE), CorruptImageError);
});

test('qcow2 map: L1 and L2 entries decode from hand-built bytes', () => {
  const l1 = hex('8000000000050000 0000000000000000 0100000000000000');
  assert.deepEqual(decodeL1Entry(l1, 0), { l2Offset: 0x50000, copied: true });
  assert.deepEqual(decodeL1Entry(l1, 1), { l2Offset: 0, copied: false });
  assert.throws(() => decodeL1Entry(l1, 2), /reserved bits/);
  const g = makeGeometry(16, false, 3);
  const l2 = hex('8000000000070000 0000000000000001 8000000000080001 4040000000012345 0000000000070200');
  const e0 = decodeL2Entry(g, l2, 0, 1 << 20);
  assert.deepEqual([e0.hostOffset, e0.copied, e0.alloc, e0.zero, e0.compressed], [0x70000, true, 1, 0, false]);
  const e1 = decodeL2Entry(g, l2, 1, 1 << 20);
  assert.deepEqual([e1.hostOffset, e1.alloc, e1.zero], [0, 0, 1]);
  const e2 = decodeL2Entry(g, l2, 2, 1 << 20);
  assert.deepEqual([e2.hostOffset, e2.alloc, e2.zero], [0x80000, 0, 1]);
  // Compressed, 64K clusters: 54 offset bits, then 1 extra sector (bit 54).
  const e3 = decodeL2Entry(g, l2, 3, 1 << 20);
  assert.deepEqual([e3.compressed, e3.compressedOffset, e3.compressedBytes], [true, 0x12345, 2 * 512 - 0x145]);
  assert.throws(() => decodeL2Entry(g, l2, 4, 1 << 20), /not aligned|unaligned/);
  assert.throws(() => decodeL2Entry(g, l2, 0, 0x70000), /outside the image file/);
  const gx = makeGeometry(16, true, 3);
  const ext = Buffer.alloc(32);
  encodeL2Entry(gx, ext, 1, { hostOffset: 0x90000, copied: true, alloc: 0x0000000f, zero: 0xf0000000 });
  assert.ok(ext.subarray(16).equals(hex('8000000000090000 f0000000 0000000f')));
  const ex = decodeL2Entry(gx, ext, 1, 1 << 20);
  assert.deepEqual([ex.alloc, ex.zero], [0xf, 0xf0000000]);
  assert.equal(subclusterMask(0, 31), 0xffffffff);
  assert.equal(subclusterMask(31, 31), 0x80000000);
  assert.equal(subclusterMask(2, 4), 0b11100);
});

test('qcow2 refcount: entries of every width, sub-byte widths LSB first', () => {
  const cases: [number, number, number, string][] = [
    [0, 3, 1, '08'],
    [1, 1, 3, '0c'],
    [2, 1, 0xa, 'a0'],
    [3, 2, 0xab, '0000ab'],
    [4, 1, 0x1234, '00001234'],
    [5, 1, 0x12345678, '0000000012345678'],
    [6, 1, 2 ** 40 + 5, '00000000000000000000010000000005'],
  ];
  for (const [order, index, value, bytes] of cases) {
    const b = Buffer.alloc(bytes.length / 2);
    writeRefcountEntry(b, index, order, value);
    assert.equal(b.toString('hex'), bytes, `order ${order}`);
    assert.equal(readRefcountEntry(b, index, order), value);
    assert.equal(readRefcountEntry(b, index === 0 ? 1 : 0, order), 0);
  }
});

test('qcow2 refcount table: entries anywhere among unused ones decode, bad ones are refused by index', () => {
  const cluster = 512;
  const table = Buffer.alloc(300 * 8);
  const used = new Map([[0, 2], [63, 3], [64, 4], [127, 5], [200, 6], [299, 7]]);
  for (const [i, c] of used) table.writeBigUInt64BE(BigInt(c * cluster), i * 8);
  const fixed = [{ what: 'header', start: 0, end: cluster }, { what: 'L1 table', start: 10 * cluster, end: 11 * cluster }];
  const out = decodeReftable(table, cluster, 64 * cluster, fixed);
  assert.equal(out.length, 300);
  out.forEach((v, i) => assert.equal(v, (used.get(i) ?? 0) * cluster, `entry ${i}`));
  const bad = (i: number, value: bigint, message: RegExp): void => {
    const t = Buffer.from(table);
    t.writeBigUInt64BE(value, i * 8);
    assert.throws(() => decodeReftable(t, cluster, 64 * cluster, fixed), (e: unknown) => e instanceof CorruptImageError && message.test(e.message));
  };
  bad(130, 8n * 512n + 1n, /refcount block 130 .* not cluster aligned/);
  bad(191, 1n << 60n, /refcount table entry 191 is out of range/);
  bad(256, 64n * 512n, /refcount block 256 .* past end of file/);
  bad(65, 10n * 512n, /refcount block 65 .* overlaps the L1 table/);
});

test('qcow2 compress: zstd frames are measured by walking their blocks', async () => {
  // Hand-built frame: single segment, 1-byte content size 5, one raw last block "hello".
  const frame = Buffer.concat([hex('28b52ffd 20 05 290000'), Buffer.from('hello'), Buffer.alloc(20, 0xee)]);
  assert.deepEqual(measureZstdFrame(frame), { frameBytes: 14, contentSize: 5 });
  assert.throws(() => measureZstdFrame(frame.subarray(0, 10)), CorruptImageError);
  assert.throws(() => measureZstdFrame(hex('00112233445566')), CorruptImageError);
  const out = Buffer.alloc(5);
  await decompressCluster(1, frame, out);
  assert.equal(out.toString(), 'hello');
  const cluster = Buffer.alloc(65536);
  for (let i = 0; i < cluster.length; i++) cluster[i] = (i * 7) % 13;
  for (const type of [0, 1] as const) {
    const c = await compressCluster(type, cluster);
    assert.ok(c !== null && c.length < cluster.length);
    const back = Buffer.alloc(65536);
    // Trailing bytes after the stream (the next cluster's data) are ignored.
    await decompressCluster(type, Buffer.concat([c, Buffer.alloc(700, 0x55)]), back);
    assert.ok(back.equals(cluster));
    await assert.rejects(decompressCluster(type, c.subarray(0, 8), Buffer.alloc(65536)), CorruptImageError);
  }
});

test('qcow2 table cache: LRU eviction and no stale copy after a racing write', async () => {
  const disk = new Map<number, Buffer>([[0, Buffer.from('a')], [1, Buffer.from('b')], [2, Buffer.from('c')]]);
  let loads = 0;
  let release: (() => void) | null = null;
  const cache = new TableCache(
    2,
    async (off) => {
      loads++;
      const v = Buffer.from(disk.get(off)!);
      if (off === 2 && release === null) await new Promise<void>((r) => (release = r));
      return v;
    },
    async (off, buf) => void disk.set(off, Buffer.from(buf)),
  );
  await cache.get(0);
  await cache.get(1);
  await cache.get(0);
  assert.equal(loads, 2);
  const slow = cache.get(2);
  await new Promise((r) => setImmediate(r));
  await cache.write(2, Buffer.from('C'));
  release!();
  assert.equal((await slow).toString(), 'C');
  assert.equal((await cache.get(2)).toString(), 'C');
  await cache.get(1);
  assert.ok(loads >= 3);
});

test('qcow2 range lock: overlapping exclusive holders run in arrival order, disjoint ones together', async () => {
  const lock = new RangeLock();
  const log: string[] = [];
  const hold = (name: string, a: number, b: number, excl: boolean, ms: number): Promise<void> =>
    lock.run(a, b, excl, async () => {
      log.push(`+${name}`);
      await new Promise((r) => setTimeout(r, ms));
      log.push(`-${name}`);
    });
  await Promise.all([hold('A', 0, 5, true, 20), hold('B', 3, 3, false, 1), hold('C', 10, 12, true, 1), hold('D', 4, 4, false, 1)]);
  assert.ok(log.indexOf('+C') < log.indexOf('-A'), 'disjoint range ran concurrently');
  assert.ok(log.indexOf('+B') > log.indexOf('-A'), 'reader waited for the writer');
  assert.ok(log.indexOf('+D') > log.indexOf('-A'));
});

test('qcow2 alloc: write, zero and discard plans follow QEMU', async () => {
  const { planWrite, planZero, planTrim } = await import('../../src/formats/qcow2/alloc.js');
  const { UNALLOCATED_ENTRY } = await import('../../src/formats/qcow2/map.js');
  const std = makeGeometry(16, false, 3);
  const ext = makeGeometry(16, true, 3);
  const owned = { ...UNALLOCATED_ENTRY, hasHost: true, hostOffset: 0x50000, copied: true, alloc: 1 };
  // Overwriting a cluster we own: in place, no metadata change.
  const inPlace = planWrite(std, 3, 100, 200, owned);
  assert.deepEqual([inPlace.allocate, inPlace.updateEntry, inPlace.spanStart, inPlace.spanEnd, inPlace.hostOffset], [false, false, 100, 200, 0x50000]);
  // Shared (COPIED clear): a new cluster, whole-cluster span so the rest is copied.
  const cow = planWrite(std, 3, 100, 200, { ...owned, copied: false });
  assert.deepEqual([cow.allocate, cow.spanStart, cow.spanEnd, cow.newAlloc], [true, 0, 65536, 1]);
  // Extended L2, unallocated: only the touched subclusters (2 KiB each) are claimed.
  const sub = planWrite(ext, 0, 2048 * 3 + 5, 2048 * 5, UNALLOCATED_ENTRY);
  assert.deepEqual([sub.allocate, sub.newAlloc, sub.spanStart, sub.spanEnd], [true, 0b11000, 2048 * 3, 2048 * 5]);
  // Zero with NO_HOLE keeps our cluster preallocated; with trim allowed it is released.
  assert.deepEqual(planZero(std, owned, 1, false, false), { kind: 'update', entry: { hostOffset: 0x50000, copied: true, alloc: 0, zero: 1 }, releaseOld: false });
  assert.deepEqual(planZero(std, owned, 1, true, false), { kind: 'update', entry: { hostOffset: 0, copied: false, alloc: 0, zero: 1 }, releaseOld: true });
  // Version 2 has no zero flag: zeros must be written when a backing file could show through.
  assert.deepEqual(planZero(makeGeometry(16, false, 2), owned, 1, true, true), { kind: 'write' });
  // Discard: zero flag when allocated or backed, nothing when already unallocated without backing.
  assert.deepEqual(planTrim(std, owned, false), { hostOffset: 0, copied: false, alloc: 0, zero: 1 });
  assert.equal(planTrim(std, UNALLOCATED_ENTRY, false), null);
  assert.deepEqual(planTrim(ext, UNALLOCATED_ENTRY, true), { hostOffset: 0, copied: false, alloc: 0, zero: 0xffffffff });
});

test('zstd: the system library and the WebAssembly fallback read each other\'s clusters', async () => {
  const native = loadNativeZstd();
  assert.ok(native, 'libzstd.so.1 is loadable (it is what qemu-img links)');
  await zstdWasm.init();
  const text = Buffer.alloc(65536);
  for (let i = 0, p = 0; p < text.length; i++) p += text.write(`cluster ${i % 97} `, p);
  for (const cluster of [text, randomBytes(65536), Buffer.alloc(65536)]) {
    const fromNative = native.compress(cluster, 3);
    assert.deepEqual(Buffer.from(zstdWasm.decompress(fromNative, { defaultHeapSize: 65536 })), cluster);
    const out = Buffer.alloc(65536);
    assert.equal(native.decompress(Buffer.from(zstdWasm.compress(cluster, 3)), out), 65536);
    assert.deepEqual(out, cluster);
  }
  assert.throws(() => native.decompress(native.compress(text, 3).subarray(0, 10), Buffer.alloc(65536)), /zstd decompression/);
  assert.throws(() => native.decompress(native.compress(text, 3), Buffer.alloc(4096)), /zstd decompression/, 'a frame larger than its cluster');
});
