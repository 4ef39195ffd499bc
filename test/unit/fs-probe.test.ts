// Superblocks laid out by hand from each filesystem's on-disk format (offsets written here,
// not imported), probed through probeFilesystem.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { DEFAULT_BLOCK_SIZES, type BlockDevice } from '../../src/block/device.js';
import { CorruptImageError, UnsupportedImageError } from '../../src/errors.js';
import { probeFilesystem, probeMountableFilesystem } from '../../src/fs/probe.js';
import { classifyExt } from '../../src/fs/ext.js';

function memDevice(buf: Buffer): BlockDevice & { reads: Array<[number, number]> } {
  const reads: Array<[number, number]> = [];
  return {
    reads,
    sizeBytes: buf.length,
    capabilities: () => ({ writable: false, flush: false, fua: false, trim: false, zero: false, fastZero: false, extents: false, allocationDepth: false, cache: false, multiConn: true, rotational: false }),
    blockSizes: () => DEFAULT_BLOCK_SIZES,
    pread: async (b, off) => {
      if (off < 0 || off + b.length > buf.length) throw new RangeError(`read [${off}, +${b.length}) outside ${buf.length}`);
      reads.push([off, b.length]);
      buf.copy(b, 0, off, off + b.length);
    },
    close: async () => {},
  };
}

const UUID_HEX = '00112233445566778899aabbccddeeff';
const UUID = '00112233-4455-6677-8899-aabbccddeeff';

function ext(compat: number, incompat: number, roCompat: number, flags = 0, size = 1 << 20): Buffer {
  const img = Buffer.alloc(size);
  const sb = 1024;
  img.writeUInt16LE(0xef53, sb + 0x38);
  img.writeUInt32LE(compat, sb + 0x5c);
  img.writeUInt32LE(incompat, sb + 0x60);
  img.writeUInt32LE(roCompat, sb + 0x64);
  Buffer.from(UUID_HEX, 'hex').copy(img, sb + 0x68);
  img.write('rootfs', sb + 0x78);
  img.writeUInt32LE(flags, sb + 0x160);
  return img;
}

// Feature values as mke2fs writes them by default (mke2fs.conf) and the blkid verdict.
const extCases: Array<[string, number, number, number, number, string | null]> = [
  ['mkfs.ext2', 0x38, 0x2, 0x3, 0, 'ext2'],
  ['mkfs.ext3', 0x3c, 0x2, 0x3, 0, 'ext3'],
  ['ext3 needing recovery', 0x3c, 0x6, 0x3, 0, 'ext3'],
  ['mkfs.ext4', 0x3c, 0x2c2, 0x46b, 0, 'ext4'],
  ['ext4 without journal', 0x38, 0x2c2, 0x46b, 0, 'ext4'],
  ['ext2 with extents', 0x38, 0x42, 0x3, 0, 'ext4'],
  ['ext4 with test_fs flag', 0x3c, 0x2c2, 0x46b, 0x4, 'ext4dev'],
  ['external journal', 0x0, 0x8, 0x0, 0, 'jbd'],
  ['recover flag without a journal', 0x0, 0x4, 0x0, 0, null],
];

for (const [what, c, i, r, f, want] of extCases) {
  test(`ext flavour: ${what} → ${want}`, async () => {
    assert.equal(classifyExt(c, i, r, f), want);
    const got = await probeFilesystem(memDevice(ext(c, i, r, f)));
    assert.equal(got?.type ?? null, want);
    if (want) {
      assert.equal(got?.uuid, UUID);
      assert.equal(got?.label, 'rootfs');
    }
  });
}

function xfs(): Buffer {
  const img = Buffer.alloc(1 << 20);
  img.write('XFSB', 0, 'latin1');
  img.writeUInt32BE(4096, 0x04);
  img.writeUInt32BE(262144, 0x0c); // sb_dblocks (low half)
  Buffer.from(UUID_HEX, 'hex').copy(img, 0x20);
  img.writeUInt32BE(4, 0x58);
  img.writeUInt16BE(512, 0x66);
  img.writeUInt16BE(512, 0x68);
  img.write('xfslabel', 0x6c);
  img[0x78] = 12;
  img[0x79] = 9;
  img[0x7a] = 9;
  img[0x7b] = 3;
  img[0x7f] = 25;
  return img;
}

test('xfs: superblock fields checked, label and uuid reported', async () => {
  assert.deepEqual(await probeFilesystem(memDevice(xfs())), { type: 'xfs', uuid: UUID, label: 'xfslabel' });
  for (const [at, v] of [[0x78, 13], [0x79, 8], [0x7b, 4], [0x7f, 101], [0x5b, 0]] as const) {
    const img = xfs();
    img[at] = v;
    assert.equal(await probeFilesystem(memDevice(img)), null, `byte 0x${at.toString(16)} = ${v}`);
  }
});

test('btrfs: magic at 64 KiB + 0x40 with its own bytenr', async () => {
  const img = Buffer.alloc(1 << 20);
  const sb = 65536;
  Buffer.from(UUID_HEX, 'hex').copy(img, sb + 0x20);
  img.writeUInt32LE(65536, sb + 0x30);
  img.write('_BHRfS_M', sb + 0x40, 'latin1');
  img.write('btr', sb + 0x12b);
  const dev = memDevice(img);
  assert.deepEqual(await probeFilesystem(dev), { type: 'btrfs', uuid: UUID, label: 'btr' });
  assert.ok(dev.reads.every(([off, len]) => off + len <= 65536 + 4096), 'reads stay bounded');
  img.writeUInt32LE(65537, sb + 0x30);
  assert.equal(await probeFilesystem(memDevice(img)), null);
});

function dirEntry(img: Buffer, at: number, name: string, attr: number, cluster = 0): void {
  img.write(name.padEnd(11, ' '), at, 'latin1');
  img[at + 0x0b] = attr;
  img.writeUInt16LE(cluster, at + 0x1a);
}

/**
 * FAT16: 4 reserved sectors, 2 FATs of 40 sectors, root directory at sector 84 (byte 43008).
 * FAT32: 32 reserved, 2 FATs of 64 sectors, 1 sector per cluster, root cluster 3 → sector 161.
 */
function fat(fat32: boolean): Buffer {
  const img = Buffer.alloc(8 << 20);
  img.set([0xeb, 0x58, 0x90], 0);
  img.write('mkfs.fat', 3, 'latin1');
  img.writeUInt16LE(512, 0x0b);
  img[0x0d] = fat32 ? 1 : 4;
  img.writeUInt16LE(fat32 ? 32 : 4, 0x0e);
  img[0x10] = 2;
  img.writeUInt16LE(fat32 ? 0 : 512, 0x11);
  img[0x15] = 0xf8;
  if (fat32) {
    img.writeUInt32LE(532480, 0x20); // 260 MiB of sectors
    img.writeUInt32LE(64, 0x24);
    img.writeUInt32LE(3, 0x2c);
    img[0x42] = 0x29;
    img.writeUInt32LE(0x1234abcd, 0x43);
    img.write('BOOT       ', 0x47, 'latin1');
    img.write('FAT32   ', 0x52, 'latin1');
  } else {
    img.writeUInt16LE(40960, 0x13);
    img.writeUInt16LE(40, 0x16);
    img[0x26] = 0x29;
    img.writeUInt32LE(0xdeadbeef, 0x27);
    img.write('NO NAME    ', 0x2b, 'latin1');
    img.write('FAT16   ', 0x36, 'latin1');
  }
  img[510] = 0x55;
  img[511] = 0xaa;
  return img;
}

test('vfat: FAT16 and FAT32 boot sectors, volume id as XXXX-XXXX, label from the root directory', async () => {
  // No volume-label entry: no label, whatever the boot sector says (blkid's LABEL_FATBOOT only).
  assert.deepEqual(await probeFilesystem(memDevice(fat(false))), { type: 'vfat', version: 'FAT16', uuid: 'DEAD-BEEF' });
  assert.deepEqual(await probeFilesystem(memDevice(fat(true))), { type: 'vfat', version: 'FAT32', uuid: '1234-ABCD' });

  const f16 = fat(false);
  const root16 = 84 * 512;
  dirEntry(f16, root16, 'OLDLABEL', 0x08 | 0x20);
  f16[root16] = 0xe5; // deleted
  dirEntry(f16, root16 + 32, 'Ab', 0x0f); // long-name fragment
  dirEntry(f16, root16 + 64, 'HELLO   TXT', 0x20, 5);
  dirEntry(f16, root16 + 96, '\x05DATA', 0x08);
  assert.equal((await probeFilesystem(memDevice(f16)))?.label, '\u00e5DATA');

  // FAT32: the root directory spans clusters 3 → 7 (chained through the FAT); the label is in 7.
  const f32 = fat(true);
  const fatAt = 32 * 512;
  const cluster = (n: number) => (32 + 2 * 64 + (n - 2)) * 512;
  f32.writeUInt32LE(7, fatAt + 3 * 4);
  f32.writeUInt32LE(0x0fffffff, fatAt + 7 * 4);
  for (let i = 0; i < 16; i++) dirEntry(f32, cluster(3) + i * 32, `FILE${i}`, 0x20, 9 + i);
  dirEntry(f32, cluster(7), 'EFI', 0x08);
  assert.equal((await probeFilesystem(memDevice(f32)))?.label, 'EFI');
  // A chain looping back on itself ends the search.
  f32.writeUInt32LE(3, fatAt + 7 * 4);
  for (let i = 0; i < 16; i++) dirEntry(f32, cluster(7) + i * 32, `MORE${i}`, 0x20, 30 + i);
  assert.equal((await probeFilesystem(memDevice(f32)))?.label, undefined);

  for (const [at, v] of [[0x10, 0], [0x15, 0x12], [0x0d, 3], [0x0b, 0x01]] as const) {
    const img = fat(false);
    img[at] = v;
    assert.equal(await probeFilesystem(memDevice(img)), null, `byte 0x${at.toString(16)} = ${v}`);
  }
});

test('squashfs and erofs', async () => {
  const sq = Buffer.alloc(8192);
  sq.write('hsqs', 0, 'latin1');
  sq.writeUInt16LE(4, 0x1c);
  sq.writeUInt16LE(0, 0x1e);
  assert.deepEqual(await probeFilesystem(memDevice(sq)), { type: 'squashfs', version: '4.0' });
  sq.writeUInt16LE(3, 0x1c);
  sq.writeUInt16LE(1, 0x1e);
  await assert.rejects(probeMountableFilesystem(memDevice(sq), 'partition 1'), (e: unknown) => e instanceof UnsupportedImageError && /SquashFS 3\.1/.test(e.message));

  const ero = Buffer.alloc(8192);
  ero.writeUInt32LE(0xe0f5e1e2, 1024);
  ero[1024 + 0x0c] = 12;
  Buffer.from(UUID_HEX, 'hex').copy(ero, 1024 + 0x30);
  ero.write('ero', 1024 + 0x40);
  assert.deepEqual(await probeFilesystem(memDevice(ero)), { type: 'erofs', uuid: UUID, label: 'ero' });
  ero[1024 + 0x0c] = 20;
  assert.equal(await probeFilesystem(memDevice(ero)), null);
});

test('swap (4 KiB and 64 KiB pages) and LUKS are recognised and refused for mounting', async () => {
  for (const page of [4096, 65536]) {
    const sw = Buffer.alloc(128 * 1024);
    sw.writeUInt32LE(1, 1024);
    sw.writeUInt32LE(31, 1028);
    Buffer.from(UUID_HEX, 'hex').copy(sw, 1024 + 0x0c);
    sw.write('swp', 1024 + 0x1c);
    sw.write('SWAPSPACE2', page - 10, 'latin1');
    assert.deepEqual(await probeFilesystem(memDevice(sw)), { type: 'swap', version: '1', uuid: UUID, label: 'swp' });
    await assert.rejects(probeMountableFilesystem(memDevice(sw), 'partition 2 of disk.img'), (e: unknown) => {
      assert.ok(e instanceof UnsupportedImageError);
      assert.equal(e.message, 'partition 2 of disk.img is a swap area, not a filesystem');
      return true;
    });
  }
  const hib = Buffer.alloc(8192);
  hib.write('S1SUSPEND', 4086, 'latin1');
  assert.equal((await probeFilesystem(memDevice(hib)))?.type, 'swsuspend');

  for (const version of [1, 2]) {
    const luks = Buffer.alloc(16384);
    luks.set([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe], 0);
    luks.writeUInt16BE(version, 6);
    if (version === 2) luks.write('secret', 0x18);
    luks.write(UUID, 0xa8, 'latin1');
    const want = { type: 'crypto_LUKS', version: String(version), uuid: UUID, ...(version === 2 ? { label: 'secret' } : {}) };
    assert.deepEqual(await probeFilesystem(memDevice(luks)), want);
    await assert.rejects(probeMountableFilesystem(memDevice(luks), 'disk.img'), /disk\.img is a LUKS encrypted volume; open it with cryptsetup/);
  }
});

test('blank, tiny and ambiguous volumes', async () => {
  assert.equal(await probeFilesystem(memDevice(Buffer.alloc(1 << 20))), null);
  assert.equal(await probeFilesystem(memDevice(Buffer.alloc(0))), null);
  assert.equal(await probeFilesystem(memDevice(Buffer.alloc(100))), null);
  await assert.rejects(probeMountableFilesystem(memDevice(Buffer.alloc(4096)), 'image x'), (e: unknown) => e instanceof UnsupportedImageError && /image x holds no recognised filesystem/.test(e.message));
  const both = ext(0x3c, 0x2c2, 0x46b);
  xfs().copy(both, 0, 0, 512);
  await assert.rejects(probeFilesystem(memDevice(both)), (e: unknown) => e instanceof CorruptImageError && /signatures of xfs and ext4 are both present/.test(e.message));
});

test('random bytes with planted magics: a result, null or CorruptImageError, with bounded reads', async () => {
  const magics: Array<[number, Buffer]> = [
    [0, Buffer.from('XFSB')],
    [0, Buffer.from('hsqs')],
    [0, Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe])],
    [0, Buffer.from([0xeb, 0x3c, 0x90])],
    [510, Buffer.from([0x55, 0xaa])],
    [1024 + 0x38, Buffer.from([0x53, 0xef])],
    [1024, Buffer.from([0xe2, 0xe1, 0xf5, 0xe0])],
    [65536 + 0x40, Buffer.from('_BHRfS_M')],
    [4086, Buffer.from('SWAPSPACE2')],
  ];
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 0, max: 70 * 1024 }),
      fc.uint8Array({ minLength: 0, maxLength: 4096 }),
      fc.subarray(magics.map((_, i) => i)),
      async (size, noise, planted) => {
        const img = Buffer.alloc(size);
        for (let i = 0; i < size; i++) img[i] = noise.length ? noise[i % noise.length] : 0;
        for (const i of planted) {
          const [at, bytes] = magics[i];
          if (at + bytes.length <= size) bytes.copy(img, at);
        }
        const dev = memDevice(img);
        try {
          await probeFilesystem(dev);
        } catch (e) {
          if (!(e instanceof CorruptImageError)) throw e;
        }
        const total = dev.reads.reduce((n, [, len]) => n + len, 0);
        assert.ok(total <= 4096 + 4096 + 5 * 10 + 1024 * 1024 + 100 * 4, `read ${total} bytes`);
      },
    ),
    { numRuns: 500 },
  );
});
