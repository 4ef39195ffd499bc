// The GPT/MBR writer, checked against the UEFI layout with a CRC32 written here (bitwise, not
// the table or node:zlib the writer uses), and read back by the project's own GPT parser.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { GPT_TYPE, encodeGuid, planSinglePartition } from '../../src/image/partition-writer.js';
import { checkGptEntryArray, decodeGptEntries, decodeGptHeader } from '../../src/partition/gpt-codec.js';
import { qcow2FullSize, qcow2RefcountMetadataBytes } from '../../src/image/measure.js';

function crc32Bitwise(buf: Buffer): number {
  let c = 0xffffffff;
  for (const byte of buf) {
    c ^= byte;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0xedb88320 : c >>> 1;
  }
  return (c ^ 0xffffffff) >>> 0;
}

function disk(plan: ReturnType<typeof planSinglePartition>, size: number): Buffer {
  const d = Buffer.alloc(size);
  for (const w of plan.writes) w.data.copy(d, w.offset);
  return d;
}

test('GPT: protective MBR, both headers with valid CRCs pointing at each other, one aligned partition', () => {
  fc.assert(
    fc.property(fc.integer({ min: 3, max: 64 }), fc.integer({ min: 0, max: 2047 }), (mib, extraSectors) => {
      const size = mib * 1024 * 1024 + extraSectors * 512;
      const plan = planSinglePartition(size, 'gpt', { name: 'root' });
      const d = disk(plan, size);
      const sectors = size / 512;
      assert.equal(d.readUInt16LE(510), 0xaa55);
      assert.equal(d[446 + 4], 0xee);
      assert.equal(d.readUInt32LE(446 + 8), 1);
      for (const [lba, alt, entriesLba] of [[1, sectors - 1, 2], [sectors - 1, 1, sectors - 33]] as const) {
        const h = d.subarray(lba * 512, lba * 512 + 512);
        assert.equal(h.toString('latin1', 0, 8), 'EFI PART');
        const copy = Buffer.from(h.subarray(0, 92));
        copy.writeUInt32LE(0, 16);
        assert.equal(h.readUInt32LE(16), crc32Bitwise(copy), 'header CRC');
        assert.equal(Number(h.readBigUInt64LE(24)), lba);
        assert.equal(Number(h.readBigUInt64LE(32)), alt);
        assert.equal(Number(h.readBigUInt64LE(40)), 34);
        assert.equal(Number(h.readBigUInt64LE(48)), sectors - 34);
        assert.equal(Number(h.readBigUInt64LE(72)), entriesLba);
        const entries = d.subarray(entriesLba * 512, entriesLba * 512 + 128 * 128);
        assert.equal(h.readUInt32LE(88), crc32Bitwise(entries), 'entries CRC');
      }
      const e = d.subarray(1024, 1024 + 128);
      assert.ok(e.subarray(0, 16).equals(encodeGuid(GPT_TYPE.LINUX_FILESYSTEM)));
      const first = Number(e.readBigUInt64LE(32));
      const last = Number(e.readBigUInt64LE(40));
      assert.equal(first * 512, plan.offsetBytes);
      assert.equal((last - first + 1) * 512, plan.sizeBytes);
      assert.equal(plan.offsetBytes % (1024 * 1024), 0);
      assert.equal((plan.offsetBytes + plan.sizeBytes) % (1024 * 1024), 0);
      assert.ok(last <= sectors - 34, 'the partition ends before the backup entries');
      assert.equal(e.subarray(56, 64).toString('utf16le'), 'root');
      // The project's own GPT reader accepts both copies and sees the same partition.
      for (const lba of [1, sectors - 1]) {
        const h = decodeGptHeader(d.subarray(lba * 512, lba * 512 + 512), lba, 512, sectors);
        assert.ok(h.ok, h.ok ? '' : h.reason);
        const arr = d.subarray(h.value.entryLba * 512, h.value.entryLba * 512 + 128 * 128);
        assert.ok(checkGptEntryArray(h.value, arr).ok);
        const parts = decodeGptEntries(h.value, arr, 512);
        assert.equal(parts.length, 1);
        assert.equal(parts[0]!.startBytes, plan.offsetBytes);
        assert.equal(parts[0]!.sizeBytes, plan.sizeBytes);
        assert.equal(parts[0]!.type, GPT_TYPE.LINUX_FILESYSTEM);
      }
    }),
  );
});

test('GPT type GUIDs are stored mixed-endian', () => {
  assert.equal(encodeGuid('0fc63daf-8483-4772-8e79-3d69d8477de4').toString('hex'), 'af3dc60f838472478e793d69d8477de4');
});

test('MBR: one partition entry from 1 MiB, the boot signature, refused above 2 TiB', () => {
  const size = 10 * 1024 * 1024;
  const plan = planSinglePartition(size, 'mbr', { mbrType: 0x0c });
  const d = disk(plan, size);
  assert.equal(d.readUInt16LE(510), 0xaa55);
  assert.equal(d[446 + 4], 0x0c);
  assert.equal(d.readUInt32LE(446 + 8), 2048);
  assert.equal(d.readUInt32LE(446 + 12), size / 512 - 2048);
  assert.equal(d[462 + 4], 0, 'only one entry');
  assert.throws(() => planSinglePartition(3 * 2 ** 40, 'mbr'), /2 TiB/);
  assert.throws(() => planSinglePartition(1024 * 1024, 'gpt'), /no room/);
});

test('qcow2 measure: refcount metadata covers every cluster it counts, including itself', () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 2 ** 32 }), fc.integer({ min: 9, max: 21 }), fc.integer({ min: 0, max: 6 }), (clusters, bits, order) => {
      const cs = 2 ** bits;
      const bytes = qcow2RefcountMetadataBytes(clusters, cs, order);
      const metaClusters = bytes / cs;
      assert.ok(Number.isInteger(metaClusters) && metaClusters >= 2);
      const perBlock = (cs * 8) / 2 ** order;
      // Enough blocks for all clusters plus the metadata itself, and enough table for the blocks.
      const blocks = Math.ceil((clusters + metaClusters) / perBlock);
      assert.ok(blocks + Math.ceil((blocks * 8) / cs) <= metaClusters);
    }),
  );
  // Monotonic in the size: a bigger disk never needs less.
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 2 ** 40 }), fc.integer({ min: 1, max: 2 ** 30 }), (size, more) => {
      assert.ok(qcow2FullSize(size + more, 65536, 4, false) >= qcow2FullSize(size, 65536, 4, false));
    }),
  );
});
