// VDI header and UUID codecs against bytes written out by hand from vdi-notes.md, hostile
// headers and block maps (each refused with the right class and a message naming the field),
// and the driver against an in-memory model.

import assert from 'node:assert/strict';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import fc from 'fast-check';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../src/block/device.js';
import { CorruptImageError, RequestError, UnsupportedImageError } from '../../src/errors.js';
import { openImageWithFormat } from '../../src/formats/open.js';
import { probeFormat, readProbeHead } from '../../src/formats/probe.js';
import { createVdi } from '../../src/formats/vdi/create.js';
import { openVdiPath } from '../../src/formats/vdi/format.js';
import { parseVdiHeader, VDI_DISCARDED } from '../../src/formats/vdi/header.js';
import { encodeVdiUuid, formatVdiUuid } from '../../src/formats/vdi/uuid.js';
import { prng, readAll } from '../fixtures/qcow2/helpers.js';
import { tempDir } from '../helpers/peers.js';

const MiB = 1024 * 1024;

test('vdi uuid: the first three fields are little-endian on disk, the last 8 bytes as they are', () => {
  const disk = Buffer.from('67452301ab89efcd0123456789abcdef', 'hex');
  assert.equal(formatVdiUuid(disk), '01234567-89ab-cdef-0123-456789abcdef');
  assert.equal(encodeVdiUuid('01234567-89ab-cdef-0123-456789abcdef').toString('hex'), disk.toString('hex'));
});

/** A dynamic 3 MiB image's header, field by field at the offsets in vdi-notes.md section 3. */
function goldenHeader(): Buffer {
  const b = Buffer.alloc(512);
  b.write('<<< QEMU VM Virtual Disk Image >>>\n', 0, 'latin1');
  b.write('7f10dabe', 0x40, 'hex');
  b.write('01000100', 0x44, 'hex');
  b.write('80010000', 0x48, 'hex');
  b.write('01000000', 0x4c, 'hex');
  b.write('00020000', 0x154, 'hex');
  b.write('00040000', 0x158, 'hex');
  b.write('00020000', 0x168, 'hex');
  b.write('0000300000000000', 0x170, 'hex');
  b.write('00001000', 0x178, 'hex');
  b.write('03000000', 0x180, 'hex');
  b.write('01000000', 0x184, 'hex');
  b.write('67452301ab89efcd0123456789abcdef', 0x188, 'hex');
  return b;
}

test('vdi header: golden bytes decode field by field', () => {
  const h = parseVdiHeader(goldenHeader(), 2 * MiB);
  assert.equal(h.imageType, 1);
  assert.equal(h.offsetBmap, 512);
  assert.equal(h.offsetData, 1024);
  assert.equal(h.diskSize, 3 * MiB);
  assert.equal(h.blockSize, MiB);
  assert.equal(h.blocksInImage, 3);
  assert.equal(h.blocksAllocated, 1);
  assert.equal(formatVdiUuid(h.uuidImage), '01234567-89ab-cdef-0123-456789abcdef');
});

test('vdi create: header, map and sizes as qemu-img lays them out', async (t) => {
  const dir = tempDir(t);
  const d = join(dir, 'd.vdi');
  const s = join(dir, 's.vdi');
  await createVdi(d, { sizeBytes: 5_000_000 });
  await createVdi(s, { sizeBytes: 5_000_000, static: true });
  const dyn = readFileSync(d);
  // 5,000,000 rounds up to 5,000,192 (whole sectors): 5 blocks, a 512-byte map, data at 1024.
  assert.equal(dyn.length, 1024);
  const h = parseVdiHeader(dyn, dyn.length);
  assert.deepEqual([h.imageType, h.diskSize, h.blocksInImage, h.blocksAllocated, h.offsetBmap, h.offsetData], [1, 5_000_192, 5, 0, 512, 1024]);
  for (let i = 0; i < 5; i++) assert.equal(dyn.readUInt32LE(512 + i * 4), 0xffffffff);
  assert.equal(statSync(s).size, 1024 + 5 * MiB);
  const st = readFileSync(s).subarray(0, 1024);
  const hs = parseVdiHeader(st, statSync(s).size);
  assert.deepEqual([hs.imageType, hs.blocksAllocated], [2, 5]);
  for (let i = 0; i < 5; i++) assert.equal(st.readUInt32LE(512 + i * 4), i);
});

interface Mutation {
  readonly name: string;
  readonly poke: (img: Buffer) => Buffer;
  readonly error: typeof CorruptImageError | typeof UnsupportedImageError;
  readonly message: RegExp;
}

const u32 = (at: number, v: number) => (b: Buffer) => (b.writeUInt32LE(v, at), b);

// Base image for mutations: dynamic, 4 MiB (4 blocks), blocks 1 and 3 written (indices 0 and 1).
const MUTATIONS: Mutation[] = [
  { name: 'bad signature', poke: u32(0x40, 0xbeda1070), error: CorruptImageError, message: /bad signature/ },
  { name: 'version 1.0', poke: u32(0x44, 0x00010000), error: UnsupportedImageError, message: /version 1\.0 is not supported/ },
  { name: 'header size too small', poke: u32(0x48, 0x100), error: CorruptImageError, message: /header size 256/ },
  { name: 'header size too large', poke: u32(0x48, 0x10000), error: CorruptImageError, message: /header size 65536/ },
  { name: 'image type 3', poke: u32(0x4c, 3), error: UnsupportedImageError, message: /image type 3/ },
  { name: 'block size 2 MiB', poke: u32(0x178, 2 * MiB), error: UnsupportedImageError, message: /block size 2097152 is not 1 MiB/ },
  { name: 'sector size 4096', poke: u32(0x168, 4096), error: UnsupportedImageError, message: /sector size 4096/ },
  { name: 'block count absurd', poke: u32(0x180, 0xfffffff0), error: CorruptImageError, message: /block count 4294967280 exceeds the maximum/ },
  { name: 'block count beyond the disk size', poke: u32(0x180, 1000), error: CorruptImageError, message: /block count 1000 does not match the disk size/ },
  { name: 'disk size larger than the blocks', poke: (b) => (b.writeBigUInt64LE(5n * BigInt(MiB), 0x170), b), error: CorruptImageError, message: /disk size 5242880 is larger than 4 blocks/ },
  { name: 'disk size above 2^53', poke: (b) => (b.writeBigUInt64LE(1n << 60n, 0x170), b), error: CorruptImageError, message: /disk size .* out of range/ },
  { name: 'disk size above the VDI maximum', poke: (b) => (b.writeBigUInt64LE(1n << 50n, 0x170), b), error: UnsupportedImageError, message: /exceeds the maximum/ },
  { name: 'blocks allocated above the block count', poke: u32(0x184, 9), error: CorruptImageError, message: /9 blocks allocated out of 4/ },
  { name: 'map offset past EOF', poke: u32(0x154, 512 * 100000), error: CorruptImageError, message: /block map at 51200000 .* past the end/ },
  { name: 'map offset unaligned', poke: u32(0x154, 600), error: UnsupportedImageError, message: /unaligned block map offset 600/ },
  { name: 'map offset inside the header', poke: u32(0x154, 0), error: CorruptImageError, message: /block map offset 0 overlaps the header/ },
  { name: 'data offset unaligned', poke: u32(0x158, 1000), error: UnsupportedImageError, message: /unaligned data offset 1000/ },
  { name: 'data offset overlapping the map', poke: u32(0x158, 512), error: CorruptImageError, message: /data offset 512 overlaps the block map/ },
  { name: 'map entry pointing past EOF', poke: (b) => (b.writeUInt32LE(2, 512), b.writeUInt32LE(3, 0x184), b), error: CorruptImageError, message: /entry 0 = 2 points past the end/ },
  { name: 'map entry at or above blocks_allocated', poke: u32(512, 2), error: CorruptImageError, message: /entry 0 = 2 is not below blocks_allocated \(2\)/ },
  { name: 'two entries sharing a block', poke: u32(512, 0), error: CorruptImageError, message: /block 0 is mapped by more than one block map entry/ },
  { name: 'non-null parent UUID', poke: u32(0x1b8, 1), error: UnsupportedImageError, message: /non-NULL parent UUID/ },
  { name: 'non-null link UUID', poke: u32(0x1a8, 1), error: UnsupportedImageError, message: /non-NULL link UUID/ },
  { name: 'file shorter than the header', poke: (b) => b.subarray(0, 100), error: CorruptImageError, message: /too short/ },
];

async function baseImage(dir: string): Promise<string> {
  const p = join(dir, 'h.vdi');
  await createVdi(p, { sizeBytes: 4 * MiB });
  const dev = await openVdiPath(p);
  await dev.pwrite(Buffer.alloc(10, 1), MiB);
  await dev.pwrite(Buffer.alloc(10, 3), 3 * MiB);
  await dev.close();
  return p;
}

for (const m of MUTATIONS) {
  test(`vdi hostile: ${m.name}`, async (t) => {
    const dir = tempDir(t);
    const p = await baseImage(dir);
    const img = readFileSync(p);
    // Sanity: the unmutated image maps block 1 -> 0 and block 3 -> 1.
    assert.deepEqual([img.readUInt32LE(512), img.readUInt32LE(516), img.readUInt32LE(524)], [0xffffffff, 0, 1]);
    // Mutations that name "entry 0" move block 1's entry there first.
    if (/entry 0|two entries/.test(m.name)) img.writeUInt32LE(img.readUInt32LE(516), 512);
    writeFileSync(p, m.poke(img));
    for (const readOnly of [true, false]) {
      await assert.rejects(openVdiPath(p, { readOnly }), (e: unknown) => {
        assert.ok(e instanceof m.error, `expected ${m.error.name}, got ${String(e)}`);
        assert.match((e as Error).message, m.message);
        return true;
      });
    }
  });
}

for (const isStatic of [false, true]) {
  test(`vdi driver: random writes/zeroes/trims match a model (${isStatic ? 'static' : 'dynamic'})`, async (t) => {
    const dir = tempDir(t);
    const p = join(dir, 'w.vdi');
    const size = 12 * MiB + 512;
    await createVdi(p, { sizeBytes: size, static: isStatic });
    const rand = prng(isStatic ? 11 : 12);
    const model = Buffer.alloc(size);
    let dev = await openVdiPath(p);
    for (let i = 0; i < 200; i++) {
      const off = Math.floor(rand() * size);
      const len = Math.min(size - off, 1 + Math.floor(rand() * (rand() < 0.2 ? 4 * MiB : 100_000)));
      const op = rand();
      if (op < 0.7) {
        const data = Buffer.alloc(len, 1 + Math.floor(rand() * 255));
        if (len >= 4) data.writeUInt32LE(i, 0);
        await dev.pwrite(data, off);
        data.copy(model, off);
      } else if (op < 0.85) {
        await dev.zero!(off, len, { mayTrim: rand() < 0.5 });
        model.fill(0, off, off + len);
      } else {
        await dev.trim!(off, len);
        model.fill(0, off, off + len);
      }
      if (i % 50 === 49) {
        await dev.close();
        dev = await openVdiPath(p);
        assert.ok((await readAll(dev)).equals(model), `content after op ${i}`);
      }
    }
    await dev.close();
  });
}

test('vdi driver: extents and depth report unallocated and discarded blocks as zero', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'e.vdi');
  await createVdi(p, { sizeBytes: 4 * MiB });
  const dev = await openVdiPath(p);
  await dev.pwrite(Buffer.alloc(1, 1), MiB + 5);
  await dev.pwrite(Buffer.alloc(1, 2), 2 * MiB + 5);
  await dev.close();
  const img = readFileSync(p);
  img.writeUInt32LE(VDI_DISCARDED, 512 + 8);
  writeFileSync(p, img);
  const ro = await openVdiPath(p, { readOnly: true });
  t.after(() => ro.close());
  assert.deepEqual(await ro.extents(0, 4 * MiB), [
    { length: MiB, flags: EXTENT_HOLE | EXTENT_ZERO },
    { length: MiB, flags: 0 },
    { length: 2 * MiB, flags: EXTENT_HOLE | EXTENT_ZERO },
  ]);
  assert.deepEqual(await ro.allocationDepth(0, 4 * MiB), [
    { length: MiB, depth: 0 },
    { length: MiB, depth: 1 },
    { length: 2 * MiB, depth: 0 },
  ]);
  const all = await readAll(ro);
  assert.equal(all[MiB + 5], 1);
  assert.equal(all[2 * MiB + 5], 0, 'a discarded block reads as zeros');
});

test('vdi: with every block index handed out, a new block is refused with ENOSPC and nothing changes', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'full.vdi');
  await createVdi(p, { sizeBytes: 2 * MiB });
  const dev = await openVdiPath(p);
  await dev.pwrite(Buffer.alloc(10, 1), 0);
  await dev.pwrite(Buffer.alloc(10, 4), MiB);
  await dev.close();
  const img = readFileSync(p);
  img.writeUInt32LE(0xffffffff, 512); // block 0's index 0 is leaked: counted, no longer mapped
  writeFileSync(p, img);
  const rw = await openVdiPath(p);
  t.after(() => rw.close());
  assert.equal(rw.repairedLeakedBlocks, 0, 'a leak below a mapped block is not repairable');
  await rw.pwrite(Buffer.alloc(10, 2), MiB + 5);
  await assert.rejects(rw.pwrite(Buffer.alloc(10, 3), 0), (e: unknown) => e instanceof RequestError && e.errno === 'ENOSPC');
  const buf = Buffer.alloc(2 * MiB);
  await rw.pread(buf, 0);
  assert.ok(buf.subarray(0, MiB).every((b) => b === 0));
  assert.deepEqual([...buf.subarray(MiB, MiB + 16)], [4, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0]);
});

test('vdi: blocks counted but unmapped at the tail (a crash between header and map) are given back on a writable open', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'crash.vdi');
  await createVdi(p, { sizeBytes: 4 * MiB });
  const dev = await openVdiPath(p);
  await dev.pwrite(Buffer.alloc(10, 1), 2 * MiB);
  await dev.close();
  const img = readFileSync(p);
  img.writeUInt32LE(3, 0x184);
  writeFileSync(p, Buffer.concat([img, Buffer.alloc(2 * MiB, 9)]));
  const ro = await openVdiPath(p, { readOnly: true });
  assert.equal(ro.repairedLeakedBlocks, 0);
  assert.equal(ro.header.blocksAllocated, 3);
  await ro.close();
  const rw = await openVdiPath(p);
  t.after(() => rw.close());
  assert.equal(rw.repairedLeakedBlocks, 2);
  assert.equal(readFileSync(p).readUInt32LE(0x184), 1);
  assert.equal(statSync(p).size, 1024 + MiB);
  await rw.pwrite(Buffer.alloc(10, 5), 0);
  assert.equal(readFileSync(p).readUInt32LE(512), 1, 'the next block takes the first free index');
  const buf = Buffer.alloc(4 * MiB);
  await rw.pread(buf, 0);
  assert.equal(buf[0], 5);
  assert.equal(buf[2 * MiB], 1);
});

test('vdi is in the default registry: probed by the signature at 0x40 and opened', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'reg.vdi');
  await createVdi(p, { sizeBytes: 3 * MiB, static: true });
  assert.equal(probeFormat(await readProbeHead(p)), 'vdi');
  const r = await openImageWithFormat(p, { readOnly: true });
  t.after(() => r.device.close());
  assert.equal(r.format, 'vdi');
  assert.equal(r.device.sizeBytes, 3 * MiB);
});

test('vdi uuid: text to disk bytes and back is the identity, and only the first 8 bytes move (property)', () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 16, maxLength: 16 }), (bytes) => {
      const disk = Buffer.from(bytes);
      const text = formatVdiUuid(disk);
      assert.deepEqual(encodeVdiUuid(text), disk);
      assert.equal(text.replace(/-/g, '').slice(16), disk.subarray(8).toString('hex'));
    }),
  );
});
