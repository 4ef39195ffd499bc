// QED header codec against bytes written out by hand from qed_spec.rst, and hostile headers:
// each mutation of a valid image must be refused with the right error class and a message
// naming the problem, before any table is read.

import assert from 'node:assert/strict';
import { readFileSync, writeFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import fc from 'fast-check';
import { CorruptImageError, UnsupportedImageError } from '../../src/errors.js';
import { createQed } from '../../src/formats/qed/create.js';
import { openQedPath } from '../../src/formats/qed/format.js';
import { encodeQedHeader, parseQedHeader, QED_F } from '../../src/formats/qed/header.js';
import { tempDir } from '../helpers/peers.js';

// magic "QED\0", cluster 65536, table 4, header 1, features BACKING_FILE|NO_PROBE, compat 0,
// autoclear 0, L1 at 65536, image size 16 MiB, backing name at 64, 8 bytes.
const GOLDEN = Buffer.from(
  [
    '51454400', '00000100', '04000000', '01000000',
    '0500000000000000', '0000000000000000', '0000000000000000',
    '0000010000000000', '0000000100000000',
    '40000000', '08000000',
  ].join(''),
  'hex',
);

test('qed header: golden bytes decode field by field', () => {
  const h = parseQedHeader(GOLDEN, 65536 * 5);
  assert.deepEqual(h, {
    clusterSize: 65536,
    tableSize: 4,
    headerSize: 1,
    features: QED_F.BACKING_FILE | QED_F.BACKING_FORMAT_NO_PROBE,
    compatFeatures: 0n,
    autoclearFeatures: 0n,
    l1TableOffset: 65536,
    imageSize: 16 * 1024 * 1024,
    backingFilenameOffset: 64,
    backingFilenameSize: 8,
  });
});

test('qed header: encode reproduces the golden bytes', () => {
  assert.equal(encodeQedHeader(parseQedHeader(GOLDEN, 65536 * 5)).toString('hex'), GOLDEN.toString('hex'));
});

test('qed create: the file is header cluster + zero L1 table, as qemu-img lays it out', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'a.qed');
  await createQed(p, { sizeBytes: 16 * 1024 * 1024, backingFile: 'basefile', backingFormat: 'raw' });
  const bytes = readFileSync(p);
  assert.equal(bytes.length, 65536 + 4 * 65536);
  assert.equal(bytes.subarray(0, 64).toString('hex'), GOLDEN.toString('hex'));
  assert.equal(bytes.subarray(64, 72).toString('latin1'), 'basefile');
  assert.ok(bytes.subarray(65536).every((b) => b === 0));
});

interface Mutation {
  readonly name: string;
  readonly poke: (img: Buffer) => Buffer;
  readonly error: typeof CorruptImageError | typeof UnsupportedImageError;
  readonly message: RegExp;
}

const u32 = (at: number, v: number) => (b: Buffer) => (b.writeUInt32LE(v, at), b);
const u64 = (at: number, v: bigint) => (b: Buffer) => (b.writeBigUInt64LE(v, at), b);

const MUTATIONS: Mutation[] = [
  { name: 'bad magic', poke: u32(0, 0x00444552), error: CorruptImageError, message: /bad magic/ },
  { name: 'cluster size not a power of two', poke: u32(4, 3 * 4096), error: CorruptImageError, message: /cluster size 12288 is not a power of two/ },
  { name: 'cluster size below 4K', poke: u32(4, 2048), error: CorruptImageError, message: /cluster size 2048/ },
  { name: 'cluster size above 64M', poke: u32(4, 1 << 27), error: CorruptImageError, message: /cluster size 134217728/ },
  { name: 'table size 0', poke: u32(8, 0), error: CorruptImageError, message: /table size 0 is not a power of two in \[1, 16\]/ },
  { name: 'table size 32', poke: u32(8, 32), error: CorruptImageError, message: /table size 32/ },
  { name: 'table size 3', poke: u32(8, 3), error: CorruptImageError, message: /table size 3/ },
  { name: 'tables over the size limit', poke: (b) => (b.writeUInt32LE(1 << 26, 4), b.writeUInt32LE(16, 8), b), error: UnsupportedImageError, message: /exceed this driver's/ },
  { name: 'header size 0', poke: u32(12, 0), error: CorruptImageError, message: /header size is 0/ },
  { name: 'header size past EOF', poke: u32(12, 1000), error: CorruptImageError, message: /header size 1000 clusters .* past the end/ },
  { name: 'unknown feature bit', poke: u64(16, 0x08n), error: UnsupportedImageError, message: /unknown feature bits 0x8/ },
  { name: 'high unknown feature bit', poke: u64(16, 1n << 63n), error: UnsupportedImageError, message: /unknown feature bits 0x8000000000000000/ },
  { name: 'L1 offset unaligned', poke: u64(40, 65536n + 512n), error: CorruptImageError, message: /L1 table offset 66048 is not cluster aligned/ },
  { name: 'L1 offset past EOF', poke: u64(40, 65536n * 100n), error: CorruptImageError, message: /L1 table at 6553600 .* past the end/ },
  { name: 'L1 offset inside the header', poke: u64(40, 0n), error: CorruptImageError, message: /overlaps the 65536-byte header/ },
  { name: 'L1 offset above 2^53', poke: u64(40, 1n << 60n), error: CorruptImageError, message: /L1 table offset 1152921504606846976 is out of range/ },
  { name: 'image size not a multiple of 512', poke: u64(48, 1_000_000n), error: CorruptImageError, message: /image size 1000000 is not a multiple of 512/ },
  { name: 'image size beyond the L1 reach', poke: u64(48, 1n << 52n), error: CorruptImageError, message: /exceeds what the L1 table can map/ },
  {
    name: 'backing name past the header cluster',
    poke: (b) => (b.writeBigUInt64LE(BigInt(QED_F.BACKING_FILE), 16), b.writeUInt32LE(65500, 56), b.writeUInt32LE(100, 60), b),
    error: CorruptImageError,
    message: /backing file name \[65500, \+100\) is past the 65536-byte header area/,
  },
  {
    name: 'backing name with offset overflow',
    poke: (b) => (b.writeBigUInt64LE(BigInt(QED_F.BACKING_FILE), 16), b.writeUInt32LE(0xffffffff, 56), b.writeUInt32LE(0xffffffff, 60), b),
    error: CorruptImageError,
    message: /past the 65536-byte header area/,
  },
  { name: 'backing flag with empty name', poke: u64(16, BigInt(QED_F.BACKING_FILE)), error: CorruptImageError, message: /empty name/ },
  { name: 'file shorter than the header', poke: (b) => b.subarray(0, 40), error: CorruptImageError, message: /too short/ },
];

for (const m of MUTATIONS) {
  test(`qed hostile header: ${m.name}`, async (t) => {
    const dir = tempDir(t);
    const p = join(dir, 'h.qed');
    await createQed(p, { sizeBytes: 16 * 1024 * 1024 });
    writeFileSync(p, m.poke(readFileSync(p)));
    for (const readOnly of [true, false]) {
      await assert.rejects(openQedPath(p, { readOnly }), (e: unknown) => {
        assert.ok(e instanceof m.error, `expected ${m.error.name}, got ${String(e)}`);
        assert.match((e as Error).message, m.message);
        return true;
      });
    }
  });
}

test('qed hostile tables: bad L1 and L2 entries fail the request that meets them, not the process', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 't.qed');
  await createQed(p, { sizeBytes: 64 * 1024 * 1024, clusterSize: 4096, tableSize: 1 });
  const dev = await openQedPath(p);
  await dev.pwrite(Buffer.alloc(4096, 1), 0);
  await dev.close();
  const img = readFileSync(p);
  const l2 = Number(img.readBigUInt64LE(4096));
  // L1[1] unaligned, L1[2] past EOF, L2[0][1] past EOF, L2[0][2] unaligned.
  img.writeBigUInt64LE(4096n * 3n + 8n, 4096 + 8);
  img.writeBigUInt64LE(4096n * 1000n, 4096 + 16);
  img.writeBigUInt64LE(4096n * 1000n, l2 + 8);
  img.writeBigUInt64LE(BigInt(l2) + 100n, l2 + 16);
  writeFileSync(p, img);
  const ro = await openQedPath(p, { readOnly: true });
  t.after(() => ro.close());
  const span = 4096 * 512;
  const buf = Buffer.alloc(4096);
  await ro.pread(buf, 0);
  assert.ok(buf.every((b) => b === 1));
  await assert.rejects(ro.pread(buf, 4096), /L2\[0\]\[1\] = 4096000 is not a valid data cluster offset/);
  await assert.rejects(ro.pread(buf, 8192), /L2\[0\]\[2\] = \d+ is not a valid data cluster offset/);
  await assert.rejects(ro.pread(buf, span), /L1\[1\] = 12296 is not a valid L2 table offset/);
  await assert.rejects(ro.pread(buf, 2 * span), CorruptImageError);
  await assert.rejects(ro.extents!(0, 3 * span), CorruptImageError);
});

test('qed hostile: a file truncated inside the L1 table is refused', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'short.qed');
  await createQed(p, { sizeBytes: 16 * 1024 * 1024 });
  truncateSync(p, 65536 + 1000);
  await assert.rejects(openQedPath(p, { readOnly: true }), /L1 table at 65536 .* past the end/);
});

test('qed header: any valid header survives encode then parse (property)', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 12, max: 20 }),
      fc.integer({ min: 0, max: 4 }),
      fc.integer({ min: 0, max: 7 }),
      fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
      fc.integer({ min: 0, max: 2 ** 30 }),
      fc.integer({ min: 1, max: 200 }),
      (clusterBits, tableBits, features, compat, sectors, nameLen) => {
        const clusterSize = 2 ** clusterBits;
        const tableSize = 2 ** tableBits;
        const n = (clusterSize * tableSize) / 8;
        const imageSize = Math.min(sectors * 512, Math.floor((n * n * clusterSize) / 512) * 512);
        const h = {
          clusterSize,
          tableSize,
          headerSize: 1,
          features,
          compatFeatures: compat,
          autoclearFeatures: 0n,
          l1TableOffset: clusterSize,
          imageSize,
          backingFilenameOffset: features & QED_F.BACKING_FILE ? 64 : 0,
          backingFilenameSize: features & QED_F.BACKING_FILE ? nameLen : 0,
        };
        assert.deepEqual(parseQedHeader(encodeQedHeader(h), clusterSize * (1 + tableSize)), h);
      },
    ),
  );
});
