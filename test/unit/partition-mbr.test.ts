// MBR tables built byte by byte from the layout (sector 0: entries at 0x1BE, 16 bytes each,
// LBA at +8 and count at +12 little-endian, 0x55AA at 0x1FE; EBR data entries relative to their
// EBR, links relative to the extended partition), independent of the parser under test.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { DEFAULT_BLOCK_SIZES, type BlockDevice } from '../../src/block/device.js';
import { CorruptImageError } from '../../src/errors.js';
import { findPartition, PartitionNotFoundError, readPartitions } from '../../src/partition/table.js';

const S = 512;

function memDevice(buf: Buffer): BlockDevice {
  return {
    sizeBytes: buf.length,
    capabilities: () => ({ writable: false, flush: false, fua: false, trim: false, zero: false, fastZero: false, extents: false, allocationDepth: false, cache: false, multiConn: true, rotational: false }),
    blockSizes: () => DEFAULT_BLOCK_SIZES,
    pread: async (b, off) => {
      if (off < 0 || off + b.length > buf.length) throw new RangeError(`read [${off}, +${b.length}) outside ${buf.length}`);
      buf.copy(b, 0, off, off + b.length);
    },
    close: async () => {},
  };
}

interface E {
  boot?: number;
  type: number;
  start: number;
  sectors: number;
}

function putSector(img: Buffer, lba: number, entries: Array<E | null>, sig = true): void {
  const base = lba * S;
  entries.forEach((e, slot) => {
    if (!e) return;
    const p = base + 0x1be + slot * 16;
    img[p] = e.boot ?? 0;
    img[p + 4] = e.type;
    img.writeUInt32LE(e.start, p + 8);
    img.writeUInt32LE(e.sectors, p + 12);
  });
  if (sig) {
    img[base + 510] = 0x55;
    img[base + 511] = 0xaa;
  }
}

/**
 * 64 MiB disk: p1 83 boot [2048, +8192), p2 empty, p3 extended [10240, +40960) holding
 * logicals 5 [EBR 10240, data +2048 → 12288, +4096], 6 [EBR 18432, data 20480, +4096],
 * 7 [EBR 26624, data 28672, +8192], p4 82 [51200, +4096].
 */
function sampleDisk(): Buffer {
  const img = Buffer.alloc(64 * 1024 * 1024);
  img.writeUInt32LE(0xdeadbeef, 0x1b8);
  putSector(img, 0, [
    { boot: 0x80, type: 0x83, start: 2048, sectors: 8192 },
    null,
    { type: 0x05, start: 10240, sectors: 40960 },
    { type: 0x82, start: 51200, sectors: 4096 },
  ]);
  putSector(img, 10240, [{ type: 0x83, start: 2048, sectors: 4096 }, { type: 0x05, start: 8192, sectors: 8192 }]);
  putSector(img, 18432, [{ type: 0x83, start: 2048, sectors: 4096 }, { type: 0x05, start: 16384, sectors: 16384 }]);
  putSector(img, 26624, [{ type: 0x8e, start: 2048, sectors: 8192 }]);
  return img;
}

test('primaries keep their slot numbers and logicals are numbered from 5 in chain order', async () => {
  const t = await readPartitions(memDevice(sampleDisk()));
  assert.equal(t.scheme, 'mbr');
  assert.equal(t.diskId, '0xdeadbeef');
  assert.deepEqual(t.warnings, []);
  const rows = t.partitions.map((p) => [p.number, p.startBytes / S, p.sizeBytes / S, p.type, p.bootable, p.extended ?? false]);
  assert.deepEqual(rows, [
    [1, 2048, 8192, '83', true, false],
    [3, 10240, 40960, '05', false, true],
    [4, 51200, 4096, '82', false, false],
    [5, 12288, 4096, '83', false, false],
    [6, 20480, 4096, '83', false, false],
    [7, 28672, 8192, '8e', false, false],
  ]);
  assert.equal(t.partitions.find((p) => p.number === 6)?.uuid, 'deadbeef-06');
});

test('findPartition selects by number and lists what exists when the number is missing', async () => {
  const dev = memDevice(sampleDisk());
  const { partition } = await findPartition(dev, 7);
  assert.equal(partition.startBytes, 28672 * S);
  await assert.rejects(findPartition(dev, 2), (e: unknown) => {
    assert.ok(e instanceof PartitionNotFoundError);
    assert.equal(e.code, 'ERR_PARTITION_NOT_FOUND');
    assert.match(e.message, /no partition 2/);
    for (const n of [1, 3, 4, 5, 6, 7]) assert.match(e.message, new RegExp(`(^|; |: )${n} type`));
    return true;
  });
  await assert.rejects(findPartition(dev, 3), /extended partition/);
  await assert.rejects(findPartition(dev, { name: 'root' }), /only in GPT/);
});

test('no signature, a bad boot indicator or a FAT boot sector mean no partition table', async () => {
  const noSig = sampleDisk();
  noSig[511] = 0;
  assert.equal((await readPartitions(memDevice(noSig))).scheme, 'none');

  const badBoot = sampleDisk();
  badBoot[0x1be + 16] = 0x12;
  assert.equal((await readPartitions(memDevice(badBoot))).scheme, 'none');

  // A FAT16 superfloppy: jump, 512-byte sectors, 4 sectors/cluster, 1 reserved, 2 FATs,
  // 512 root entries, 65536 sectors, media 0xF8, 64 sectors per FAT, 0x55AA.
  const fat = Buffer.alloc(64 * 1024 * 1024);
  fat.set([0xeb, 0x3c, 0x90], 0);
  fat.writeUInt16LE(512, 0x0b);
  fat[0x0d] = 4;
  fat.writeUInt16LE(1, 0x0e);
  fat[0x10] = 2;
  fat.writeUInt16LE(512, 0x11);
  fat.writeUInt16LE(0, 0x13);
  fat.writeUInt32LE(131072, 0x20);
  fat[0x15] = 0xf8;
  fat.writeUInt16LE(128, 0x16);
  fat[510] = 0x55;
  fat[511] = 0xaa;
  assert.equal((await readPartitions(memDevice(fat))).scheme, 'none');

  assert.equal((await readPartitions(memDevice(Buffer.alloc(100)))).scheme, 'none');
});

test('an all-empty MBR is a table with no partitions', async () => {
  const img = Buffer.alloc(1024 * 1024);
  putSector(img, 0, []);
  const t = await readPartitions(memDevice(img));
  assert.equal(t.scheme, 'mbr');
  assert.deepEqual(t.partitions, []);
  await assert.rejects(findPartition(memDevice(img), 1), /MBR table has no partitions/);
});

type Mutation = [string, (img: Buffer) => void, RegExp];

const corruptions: Mutation[] = [
  ['primary starting at sector 0', (img) => img.writeUInt32LE(0, 0x1be + 8), /primary entry 1 .*sector 0/],
  ['primary past the end', (img) => img.writeUInt32LE(200000, 0x1be + 48 + 12), /primary entry 4 .*ends past/],
  ['overlapping primaries', (img) => img.writeUInt32LE(9000, 0x1be + 48 + 8), /primary entry 4 .*overlaps primary entry 1|primary entry 3 .*overlaps primary entry 4/],
  ['logical outside the extended partition', (img) => img.writeUInt32LE(40000, 18432 * S + 0x1be + 12), /logical partition 6 .*not inside extended partition 3/],
  ['link outside the extended partition', (img) => img.writeUInt32LE(40000, 18432 * S + 0x1be + 16 + 8), /link in the EBR at sector 18432 .*leaves extended partition 3/],
  ['EBR link back to the first EBR', (img) => img.writeUInt32LE(0, 18432 * S + 0x1be + 16 + 8), /loops back to sector 10240/],
  ['EBR link to itself', (img) => img.writeUInt32LE(8192, 18432 * S + 0x1be + 16 + 8), /loops back to sector 18432/],
  ['EBR cycle of two', (img) => {
    // Chain 10240 → 18432 → 26624 → 18432.
    putSector(img, 26624, [{ type: 0x8e, start: 2048, sectors: 8192 }, { type: 0x05, start: 8192, sectors: 8192 }]);
  }, /loops back to sector 18432/],
  ['overlapping logicals', (img) => img.writeUInt32LE(4096 + 8192, 10240 * S + 0x1be + 12), /logical partition 6 .*overlaps logical partition 5/],
  ['logical over the next EBR', (img) => img.writeUInt32LE(4096 + 2048 + 100, 10240 * S + 0x1be + 12), /the EBR at sector 18432 overlaps logical partition 5/],
];

for (const [what, mutate, message] of corruptions) {
  test(`MBR corruption: ${what} is a CorruptImageError naming the entry`, async () => {
    const img = sampleDisk();
    mutate(img);
    await assert.rejects(readPartitions(memDevice(img)), (e: unknown) => {
      assert.ok(e instanceof CorruptImageError, String(e));
      assert.match(e.message, message);
      return true;
    });
  });
}

test('an EBR without signature ends the chain with a warning; garbage in EBR entries 3-4 is skipped', async () => {
  const img = sampleDisk();
  img[26624 * S + 511] = 0;
  putSector(img, 18432, [null, null, { type: 0x83, start: 1, sectors: 0xffffffff }]);
  const t = await readPartitions(memDevice(img));
  assert.deepEqual(t.partitions.map((p) => p.number), [1, 3, 4, 5, 6]);
  assert.equal(t.warnings.length, 1);
  assert.match(t.warnings[0], /EBR at sector 26624 has no 0x55AA signature/);
});

test('a protective entry among valid-looking ones is not read as MBR', async () => {
  const img = sampleDisk();
  img[0x1be + 16 + 4] = 0xee;
  img.writeUInt32LE(1, 0x1be + 16 + 8);
  img.writeUInt32LE(1, 0x1be + 16 + 12);
  await assert.rejects(readPartitions(memDevice(img)), (e: unknown) => e instanceof CorruptImageError && /GPT/.test(e.message));
});

test('random MBR and EBR contents never crash or hang: a table or a CorruptImageError', async () => {
  const entry = fc.record({
    boot: fc.constantFrom(0, 0x80),
    type: fc.constantFrom(0x00, 0x05, 0x0f, 0x85, 0x83, 0x07),
    start: fc.oneof(fc.integer({ min: 0, max: 300 }), fc.nat({ max: 0xffffffff })),
    sectors: fc.oneof(fc.integer({ min: 0, max: 300 }), fc.nat({ max: 0xffffffff })),
  });
  await fc.assert(
    fc.asyncProperty(fc.array(fc.tuple(fc.integer({ min: 0, max: 255 }), fc.array(fc.option(entry), { minLength: 4, maxLength: 4 })), { maxLength: 12 }), async (sectors) => {
      const img = Buffer.alloc(256 * S);
      putSector(img, 0, [{ type: 0x05, start: 1, sectors: 255 }]);
      for (const [lba, entries] of sectors) putSector(img, lba, entries);
      try {
        const t = await readPartitions(memDevice(img));
        for (const p of t.partitions) assert.ok(p.startBytes >= 0 && p.startBytes + p.sizeBytes <= img.length);
      } catch (e) {
        if (!(e instanceof CorruptImageError)) throw e;
      }
    }),
    { numRuns: 500 },
  );
});
