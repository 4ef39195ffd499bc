// GPT images built in the test from UEFI 2.10 §5.3 (header fields at their offsets, entry
// array after it, backup array and header at the end), with CRC32 values taken from zlib's
// gzip trailer so they do not depend on the implementation under test.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { gzipSync } from 'node:zlib';
import fc from 'fast-check';
import { DEFAULT_BLOCK_SIZES, type BlockDevice } from '../../src/block/device.js';
import { CorruptImageError } from '../../src/errors.js';
import { openPartition } from '../../src/partition/open.js';
import { findPartition, PartitionNotFoundError, readPartitions } from '../../src/partition/table.js';
import { crc32 } from '../../src/util/crc32.js';

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

/** CRC32 from the gzip trailer (RFC 1952: CRC32 then ISIZE, little-endian). */
function zlibCrc(data: Buffer): number {
  const gz = gzipSync(data);
  return gz.readUInt32LE(gz.length - 8);
}

/** GUID text → mixed-endian bytes, written out here rather than taken from src. */
function guidBytes(g: string): Buffer {
  const h = g.replace(/-/g, '');
  const b = Buffer.from(h, 'hex');
  return Buffer.from([b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], ...b.subarray(8)]);
}

const LINUX_FS = '0fc63daf-8483-4772-8e79-3d69d8477de4';
const ESP = 'c12a7328-f81f-11d2-ba4b-00a0c93ec93b';

interface Ent {
  index: number;
  type: string;
  uuid: string;
  first: number;
  last: number;
  attrs?: bigint;
  name?: string;
}

interface Opts {
  sector?: number;
  sectors?: number;
  entryCount?: number;
  entries?: Ent[];
  /** Change primary header fields before its CRC is computed. */
  patchPrimary?: (h: Buffer) => void;
}

function buildGpt(o: Opts = {}): Buffer {
  const S = o.sector ?? 512;
  const total = o.sectors ?? 8192;
  const count = o.entryCount ?? 128;
  const arraySectors = Math.ceil((count * 128) / S);
  const img = Buffer.alloc(total * S);
  // Protective MBR: one 0xEE entry from LBA 1 to the end.
  img[0x1be + 4] = 0xee;
  img.writeUInt32LE(1, 0x1be + 8);
  img.writeUInt32LE(Math.min(total - 1, 0xffffffff), 0x1be + 12);
  img[510] = 0x55;
  img[511] = 0xaa;
  const array = Buffer.alloc(count * 128);
  for (const e of o.entries ?? []) {
    const p = e.index * 128;
    guidBytes(e.type).copy(array, p);
    guidBytes(e.uuid).copy(array, p + 16);
    array.writeBigUInt64LE(BigInt(e.first), p + 32);
    array.writeBigUInt64LE(BigInt(e.last), p + 40);
    array.writeBigUInt64LE(e.attrs ?? 0n, p + 48);
    Buffer.from(e.name ?? '', 'utf16le').copy(array, p + 56, 0, 72);
  }
  const firstUsable = 2 + arraySectors;
  const lastUsable = total - 2 - arraySectors;
  const header = (my: number, alt: number, entryLba: number, patch?: (h: Buffer) => void): Buffer => {
    const h = Buffer.alloc(S);
    h.write('EFI PART', 0, 'latin1');
    h.writeUInt32LE(0x00010000, 8);
    h.writeUInt32LE(92, 12);
    h.writeBigUInt64LE(BigInt(my), 24);
    h.writeBigUInt64LE(BigInt(alt), 32);
    h.writeBigUInt64LE(BigInt(firstUsable), 40);
    h.writeBigUInt64LE(BigInt(lastUsable), 48);
    guidBytes('01234567-89ab-cdef-0011-223344556677').copy(h, 56);
    h.writeBigUInt64LE(BigInt(entryLba), 72);
    h.writeUInt32LE(count, 80);
    h.writeUInt32LE(128, 84);
    h.writeUInt32LE(zlibCrc(array), 88);
    patch?.(h);
    h.writeUInt32LE(0, 16);
    h.writeUInt32LE(zlibCrc(h.subarray(0, h.readUInt32LE(12) <= S ? h.readUInt32LE(12) : 92)), 16);
    return h;
  };
  header(1, total - 1, 2, o.patchPrimary).copy(img, S);
  array.copy(img, 2 * S);
  array.copy(img, (total - 1 - arraySectors) * S);
  header(total - 1, 1, total - 1 - arraySectors).copy(img, (total - 1) * S);
  return img;
}

const ENTRIES: Ent[] = [
  { index: 0, type: ESP, uuid: 'aaaaaaaa-0000-4000-8000-000000000001', first: 2048, last: 4095, name: 'EFI system', attrs: 1n },
  { index: 2, type: LINUX_FS, uuid: 'aaaaaaaa-0000-4000-8000-000000000003', first: 4096, last: 6143, name: 'root', attrs: (1n << 2n) | (1n << 60n) },
  { index: 4, type: LINUX_FS, uuid: 'aaaaaaaa-0000-4000-8000-000000000005', first: 6144, last: 8000, name: 'dätä ✓' },
];

test('crc32 matches the standard check value and zlib', () => {
  assert.equal(crc32(Buffer.from('123456789')), 0xcbf43926);
  assert.equal(crc32(Buffer.alloc(0)), 0);
  const data = Buffer.from(Array.from({ length: 1000 }, (_, i) => (i * 7919) & 0xff));
  assert.equal(crc32(data), zlibCrc(data));
  assert.equal(crc32(data.subarray(300), crc32(data.subarray(0, 300))), zlibCrc(data));
});

test('GPT entries: Linux numbering (index + 1), names, GUIDs, attributes', async () => {
  const t = await readPartitions(memDevice(buildGpt({ entries: ENTRIES })));
  assert.equal(t.scheme, 'gpt');
  assert.equal(t.sectorBytes, 512);
  assert.equal(t.diskId, '01234567-89ab-cdef-0011-223344556677');
  assert.deepEqual(t.warnings, []);
  assert.deepEqual(
    t.partitions.map((p) => [p.number, p.startBytes, p.sizeBytes, p.type, p.uuid, p.name, p.attributes, p.bootable]),
    [
      [1, 2048 * 512, 2048 * 512, ESP, 'aaaaaaaa-0000-4000-8000-000000000001', 'EFI system', 1n, false],
      [3, 4096 * 512, 2048 * 512, LINUX_FS, 'aaaaaaaa-0000-4000-8000-000000000003', 'root', (1n << 2n) | (1n << 60n), true],
      [5, 6144 * 512, 1857 * 512, LINUX_FS, 'aaaaaaaa-0000-4000-8000-000000000005', 'dätä ✓', 0n, false],
    ],
  );
});

test('findPartition by name and by number; missing or duplicate names list the table', async () => {
  const dev = memDevice(buildGpt({ entries: ENTRIES }));
  assert.equal((await findPartition(dev, { name: 'root' })).partition.number, 3);
  assert.equal((await findPartition(dev, { name: 'dätä ✓' })).partition.number, 5);
  assert.equal((await findPartition(dev, 1)).partition.name, 'EFI system');
  await assert.rejects(findPartition(dev, { name: 'home' }), (e: unknown) => {
    assert.ok(e instanceof PartitionNotFoundError);
    assert.match(e.message, /no partition named "home": the GPT table has: 1 name="EFI system" .*; 3 name="root" .*; 5 name="dätä ✓"/);
    return true;
  });
  await assert.rejects(findPartition(dev, 2), /no partition 2/);
  const dup = memDevice(buildGpt({ entries: [...ENTRIES.slice(0, 2), { ...ENTRIES[2], name: 'root' }] }));
  await assert.rejects(findPartition(dup, { name: 'root' }), /2 partitions are named "root" \(3, 5\)/);
});

test('openPartition exposes the selected partition as a device of its own', async () => {
  const img = buildGpt({ entries: ENTRIES });
  img.write('first', 4096 * 512, 'latin1');
  img.write('last!', 6144 * 512 - 5, 'latin1');
  const { device, partition } = await openPartition(memDevice(img), { name: 'root' });
  assert.equal(partition.number, 3);
  assert.equal(device.sizeBytes, 2048 * 512);
  const head = Buffer.alloc(5);
  await device.pread(head, 0);
  assert.equal(head.toString('latin1'), 'first');
  await device.pread(head, device.sizeBytes - 5);
  assert.equal(head.toString('latin1'), 'last!');
  await assert.rejects(device.pread(Buffer.alloc(6), device.sizeBytes - 5));
  await assert.rejects(openPartition(memDevice(img), 9), PartitionNotFoundError);
});

test('a corrupt primary header falls back to the backup and says so', async () => {
  const img = buildGpt({ entries: ENTRIES });
  img[512 + 40] ^= 1; // FirstUsableLBA, breaking the header CRC
  const t = await readPartitions(memDevice(img));
  assert.deepEqual(t.partitions.map((p) => p.number), [1, 3, 5]);
  assert.equal(t.warnings.length, 1);
  assert.match(t.warnings[0], /primary GPT header at LBA 1 is invalid \(header CRC32 mismatch.*\); using the backup at LBA 8191/);
});

test('a corrupt primary entry array falls back to the backup', async () => {
  const img = buildGpt({ entries: ENTRIES });
  img[2 * 512 + 128 * 2 + 56] ^= 0x20; // a byte of the name of entry 3 in the primary array
  const t = await readPartitions(memDevice(img));
  assert.equal(t.partitions.find((p) => p.number === 3)?.name, 'root');
  assert.match(t.warnings[0], /partition entry array CRC32 mismatch/);
});

test('a corrupt backup is reported while the primary is used', async () => {
  const img = buildGpt({ entries: ENTRIES });
  img[img.length - 512 + 40] ^= 1;
  const t = await readPartitions(memDevice(img));
  assert.deepEqual(t.partitions.map((p) => p.number), [1, 3, 5]);
  assert.match(t.warnings[0], /backup GPT header at LBA 8191 is invalid/);
});

test('both headers invalid: CorruptImageError with both reasons', async () => {
  const img = buildGpt({ entries: ENTRIES });
  img[512] = 0x58;
  img[img.length - 512 + 88] ^= 1;
  await assert.rejects(readPartitions(memDevice(img)), (e: unknown) => {
    assert.ok(e instanceof CorruptImageError);
    assert.match(e.message, /primary \(LBA 1\): no "EFI PART" signature; backup \(LBA 8191\): header CRC32 mismatch/);
    return true;
  });
});

// One field changed (with a recomputed header CRC) per row: the primary must be refused for
// the stated reason, and the intact backup used.
const headerMutations: Array<[string, (h: Buffer) => void, RegExp]> = [
  ['header size below 92', (h) => h.writeUInt32LE(91, 12), /header size 91/],
  ['header size above the sector', (h) => h.writeUInt32LE(513, 12), /header size 513/],
  ['MyLBA elsewhere', (h) => h.writeBigUInt64LE(5n, 24), /MyLBA is 5/],
  ['LBA above 2^53', (h) => h.writeBigUInt64LE(1n << 60n, 48), /above 2\^53-1/],
  ['last usable past the end', (h) => h.writeBigUInt64LE(9000n, 48), /do not fit/],
  ['entry size not 128 × 2^n', (h) => h.writeUInt32LE(192, 84), /entry size 192/],
  ['entry size 0', (h) => h.writeUInt32LE(0, 84), /entry size 0/],
  ['entry count absurd (bounded before allocating)', (h) => h.writeUInt32LE(0xffffffff, 80), /exceeds the 1048576-byte limit/],
  ['entry array inside the usable area', (h) => h.writeBigUInt64LE(100n, 72), /overlaps the usable area/],
  ['entry array past the end', (h) => h.writeBigUInt64LE(8190n, 72), /outside the device/],
  ['entry array over the header', (h) => h.writeBigUInt64LE(1n, 72), /overlaps the header/],
];

for (const [what, patch, reason] of headerMutations) {
  test(`GPT primary header mutation: ${what}`, async () => {
    const t = await readPartitions(memDevice(buildGpt({ entries: ENTRIES, patchPrimary: patch })));
    assert.deepEqual(t.partitions.map((p) => p.number), [1, 3, 5]);
    assert.match(t.warnings[0], reason);
  });
}

const entryCorruptions: Array<[string, Ent[], RegExp]> = [
  ['overlapping entries', [ENTRIES[0], { ...ENTRIES[1], first: 4000 }], /GPT entry 3 overlaps GPT entry 1/],
  ['entry ending before it starts', [{ ...ENTRIES[1], first: 5000, last: 4999 }], /GPT entry 3: ends at LBA 4999 before it starts/],
  ['entry before the usable area', [{ ...ENTRIES[0], first: 10 }], /GPT entry 1: LBAs 10\.\.4095 are outside the usable area 34\.\.8158/],
  ['entry past the usable area', [{ ...ENTRIES[2], last: 8160 }], /GPT entry 5: .* outside the usable area/],
];

for (const [what, entries, message] of entryCorruptions) {
  test(`GPT entry corruption: ${what}`, async () => {
    await assert.rejects(readPartitions(memDevice(buildGpt({ entries }))), (e: unknown) => {
      assert.ok(e instanceof CorruptImageError);
      assert.match(e.message, message);
      return true;
    });
  });
}

test('a GPT with 4096-byte logical blocks is found after the 512-byte probe fails', async () => {
  const entries = [{ ...ENTRIES[1], index: 0, first: 256, last: 511 }];
  const t = await readPartitions(memDevice(buildGpt({ sector: 4096, sectors: 1024, entries })));
  assert.equal(t.scheme, 'gpt');
  assert.equal(t.sectorBytes, 4096);
  assert.deepEqual(t.partitions.map((p) => [p.number, p.startBytes, p.sizeBytes, p.name]), [[1, 256 * 4096, 256 * 4096, 'root']]);
});

test('a non-default entry count and an empty table', async () => {
  const t = await readPartitions(memDevice(buildGpt({ entryCount: 4, entries: [{ ...ENTRIES[0], index: 3 }] })));
  assert.deepEqual(t.partitions.map((p) => p.number), [4]);
  const empty = await readPartitions(memDevice(buildGpt({ entryCount: 0 })));
  assert.deepEqual(empty.partitions, []);
});

test('random bytes after a protective MBR: a table or a CorruptImageError, never anything else', async () => {
  const base = buildGpt({ entries: ENTRIES });
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.tuple(fc.integer({ min: 512, max: 4 * 512 - 1 }), fc.integer({ min: 0, max: 255 })), { maxLength: 16 }),
      fc.array(fc.tuple(fc.integer({ min: base.length - 40 * 512, max: base.length - 1 }), fc.integer({ min: 0, max: 255 })), { maxLength: 16 }),
      async (front, back) => {
        const img = Buffer.from(base);
        for (const [at, v] of [...front, ...back]) img[at] = v;
        try {
          const t = await readPartitions(memDevice(img));
          for (const p of t.partitions) assert.ok(p.startBytes + p.sizeBytes <= img.length);
        } catch (e) {
          if (!(e instanceof CorruptImageError)) throw e;
        }
      },
    ),
    { numRuns: 300 },
  );
  await fc.assert(
    fc.asyncProperty(fc.uint8Array({ minLength: 512 * 3, maxLength: 512 * 40 }), async (bytes) => {
      const img = Buffer.from(bytes);
      for (let k = 0; k < 4; k++) img[0x1be + 16 * k] = 0;
      img[0x1be + 4] = 0xee;
      img.writeUInt32LE(1, 0x1be + 12);
      img[510] = 0x55;
      img[511] = 0xaa;
      await readPartitions(memDevice(img)).catch((e: unknown) => {
        if (!(e instanceof CorruptImageError)) throw e;
      });
    }),
    { numRuns: 300 },
  );
});
