// Deliberately corrupted images (in the spirit of QEMU iotest 060): one field poked at a time,
// and the exact error the driver must give. No crash, no hang, no huge allocation.

import assert from 'node:assert/strict';
import { openSync, readSync, writeSync, closeSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { CorruptImageError, UnsupportedImageError } from '../../src/errors.js';
import { createQcow2 } from '../../src/formats/qcow2/create.js';
import { Qcow2Device } from '../../src/formats/qcow2/driver.js';
import { HostFile } from '../../src/io/host-file.js';
import { tempDir } from '../helpers/peers.js';

const CS = 65536;

function peek(path: string, offset: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  const fd = openSync(path, 'r');
  readSync(fd, b, 0, len, offset);
  closeSync(fd);
  return b;
}

function poke(path: string, offset: number, bytes: Buffer): void {
  const fd = openSync(path, 'r+');
  writeSync(fd, bytes, 0, bytes.length, offset);
  closeSync(fd);
}

const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
const u64 = (v: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
};

async function freshImage(t: TestContext, withData = true): Promise<string> {
  const path = join(tempDir(t), 'h.qcow2');
  await createQcow2(path, { sizeBytes: 8 * 1024 * 1024 });
  if (withData) {
    const dev = await Qcow2Device.open(await HostFile.open(path));
    await dev.pwrite(Buffer.alloc(CS, 0x42), 0);
    await dev.close();
  }
  return path;
}

async function openExpect(path: string, cls: typeof CorruptImageError | typeof UnsupportedImageError, message: string | RegExp, readOnly = true): Promise<void> {
  const file = await HostFile.open(path, { readOnly });
  try {
    await assert.rejects(
      async () => {
        const dev = await Qcow2Device.open(file, { readOnly });
        await dev.pread(Buffer.alloc(CS), 0);
      },
      (err: unknown) => {
        assert.ok(err instanceof cls, `expected ${cls.name}, got ${String(err)}`);
        if (typeof message === 'string') assert.equal((err as Error).message, message);
        else assert.match((err as Error).message, message);
        return true;
      },
    );
  } finally {
    await file.close();
  }
}

const l1Offset = (path: string): number => Number(peek(path, 40, 8).readBigUInt64BE(0));

test('hostile qcow2: L1 table past end of file', async (t) => {
  const p = await freshImage(t);
  const size = statSync(p).size;
  poke(p, 40, u64(BigInt(size + CS)));
  await openExpect(p, CorruptImageError, `qcow2 header: L1 table [${size + CS}, ${size + CS + 8}) is past end of file (${size})`);
});

test('hostile qcow2: L1 table overlapping the header', async (t) => {
  const p = await freshImage(t);
  poke(p, 40, u64(0n));
  await openExpect(p, CorruptImageError, 'qcow2 header: L1 table overlaps the header');
});

test('hostile qcow2: L1 table overlapping the refcount table', async (t) => {
  const p = await freshImage(t);
  poke(p, 40, peek(p, 48, 8));
  await openExpect(p, CorruptImageError, 'qcow2 header: L1 table overlaps the refcount table');
});

test('hostile qcow2: refcount table past end of file', async (t) => {
  const p = await freshImage(t);
  const size = statSync(p).size;
  poke(p, 48, u64(BigInt(size)));
  await openExpect(p, CorruptImageError, `qcow2 header: refcount table [${size}, ${size + CS}) is past end of file (${size})`);
});

test('hostile qcow2: refcount table offset 0', async (t) => {
  const p = await freshImage(t);
  poke(p, 48, u64(0n));
  await openExpect(p, CorruptImageError, 'qcow2 header: refcount table is missing');
});

test('hostile qcow2: refcount table unaligned', async (t) => {
  const p = await freshImage(t);
  poke(p, 48, u64(BigInt(CS + 512)));
  await openExpect(p, CorruptImageError, `qcow2 header: refcount table offset ${CS + 512} is not cluster aligned`);
});

for (const bits of [8, 22, 0, 0xffffffff]) {
  test(`hostile qcow2: cluster_bits ${bits}`, async (t) => {
    const p = await freshImage(t, false);
    poke(p, 20, u32(bits));
    await openExpect(p, CorruptImageError, `qcow2 header: cluster_bits ${bits} is outside 9..21`);
  });
}

test('hostile qcow2: l1_size 2^31 is refused before allocating', async (t) => {
  const p = await freshImage(t, false);
  poke(p, 36, u32(2 ** 31));
  await openExpect(p, CorruptImageError, 'qcow2 header: l1_size 2147483648 is above the 4194304-entry limit');
});

test('hostile qcow2: l1_size too small for the virtual size', async (t) => {
  const p = await freshImage(t, false);
  poke(p, 24, u64(1n << 40n));
  await openExpect(p, CorruptImageError, `qcow2 header: l1_size 1 is too small for size ${2 ** 40}`);
});

test('hostile qcow2: backing file name runs past the first cluster', async (t) => {
  const p = await freshImage(t, false);
  poke(p, 8, u64(BigInt(CS - 10)));
  poke(p, 16, u32(100));
  await openExpect(p, CorruptImageError, 'qcow2 header: backing file name runs past the first cluster');
});

test('hostile qcow2: backing file name longer than 1023 bytes', async (t) => {
  const p = await freshImage(t, false);
  poke(p, 8, u64(4096n));
  poke(p, 16, u32(1024));
  await openExpect(p, CorruptImageError, 'qcow2 header: backing file name length 1024 is above 1023');
});

test('hostile qcow2: unknown incompatible feature bit is refused and named', async (t) => {
  const p = await freshImage(t, false);
  poke(p, 72, u64(1n << 5n));
  await openExpect(p, UnsupportedImageError, 'qcow2: unsupported incompatible feature bit 5');
  // Named from the image's feature name table when it has an entry.
  const p2 = await freshImage(t, false);
  poke(p2, 72, u64((1n << 5n) | (1n << 40n)));
  const hdr = peek(p2, 0, 4096);
  const tablePos = hdr.indexOf(Buffer.from([0x68, 0x03, 0xf8, 0x57])) + 8;
  const entry = Buffer.alloc(48);
  entry[0] = 0;
  entry[1] = 40;
  entry.write('time travel', 2, 'latin1');
  poke(p2, tablePos, entry);
  await openExpect(p2, UnsupportedImageError, 'qcow2: unsupported incompatible feature bit 5, bit 40 (time travel)');
});

test('hostile qcow2: encryption is refused', async (t) => {
  const p = await freshImage(t, false);
  poke(p, 32, u32(2));
  await openExpect(p, UnsupportedImageError, 'qcow2: encryption (crypt_method 2, LUKS) is not supported');
});

test('hostile qcow2: corrupt bit allows read-only opens only', async (t) => {
  const p = await freshImage(t);
  poke(p, 72, u64(2n));
  await openExpect(p, UnsupportedImageError, 'qcow2: the image is marked corrupt; it can only be opened read-only', false);
  const dev = await Qcow2Device.open(await HostFile.open(p, { readOnly: true }));
  const b = Buffer.alloc(16);
  await dev.pread(b, 0);
  assert.ok(b.equals(Buffer.alloc(16, 0x42)));
  await dev.close();
});

test('hostile qcow2: L2 table pointer past end of file', async (t) => {
  const p = await freshImage(t);
  const size = statSync(p).size;
  poke(p, l1Offset(p), u64((1n << 63n) | BigInt(size + CS)));
  await openExpect(p, CorruptImageError, `qcow2: L2 table 0 at ${size + CS} is past end of file`);
});

test('hostile qcow2: L2 table pointer into the refcount table', async (t) => {
  const p = await freshImage(t);
  poke(p, l1Offset(p), u64((1n << 63n) | peek(p, 48, 8).readBigUInt64BE(0)));
  await openExpect(p, CorruptImageError, `qcow2: L2 table 0 at ${CS} overlaps the refcount table`);
});

test('hostile qcow2: data cluster mapped onto the L1 table', async (t) => {
  const p = await freshImage(t);
  const l2 = Number(peek(p, l1Offset(p), 8).readBigUInt64BE(0) & ((1n << 56n) - 1n));
  poke(p, l2, u64((1n << 63n) | BigInt(l1Offset(p))));
  await openExpect(p, CorruptImageError, `qcow2: guest cluster 0 maps to host offset ${l1Offset(p)}, inside the L1 table`);
});

test('hostile qcow2: a cluster inside a run of data mapped onto the L1 table', async (t) => {
  const p = join(tempDir(t), 'run.qcow2');
  await createQcow2(p, { sizeBytes: 8 * 1024 * 1024 });
  const w = await Qcow2Device.open(await HostFile.open(p));
  await w.pwrite(Buffer.alloc(4 * CS, 0x42), 0);
  await w.close();
  const l2 = Number(peek(p, l1Offset(p), 8).readBigUInt64BE(0) & ((1n << 56n) - 1n));
  poke(p, l2 + 2 * 8, u64((1n << 63n) | BigInt(l1Offset(p))));
  const dev = await Qcow2Device.open(await HostFile.open(p, { readOnly: true }), { readOnly: true });
  try {
    const message = `qcow2: guest cluster 2 maps to host offset ${l1Offset(p)}, inside the L1 table`;
    await assert.rejects(dev.pread(Buffer.alloc(4 * CS), 0), { message });
    await assert.rejects(dev.extents!(0, 4 * CS), { message });
    // The clusters before it are plain data, mapped at once; a range that reaches it is left to pread.
    assert.equal(dev.hostRun(0, 2 * CS)?.length, 2 * CS);
    assert.equal(dev.hostRun(0, 4 * CS), null);
    assert.equal(dev.readNow(Buffer.alloc(4 * CS), 0), false);
    const head = Buffer.alloc(2 * CS);
    await dev.pread(head, 0);
    assert.ok(head.equals(Buffer.alloc(2 * CS, 0x42)));
  } finally {
    await dev.close();
  }
});

test('hostile qcow2: compressed descriptor past end of file', async (t) => {
  const p = await freshImage(t);
  const size = statSync(p).size;
  const l2 = Number(peek(p, l1Offset(p), 8).readBigUInt64BE(0) & ((1n << 56n) - 1n));
  // 64K clusters: x = 62 - 8 = 54 offset bits, then the extra sector count.
  const desc = (1n << 62n) | (3n << 54n) | BigInt(size + 1000);
  poke(p, l2, u64(desc));
  await openExpect(p, CorruptImageError, `qcow2: compressed cluster at ${size + 1000} (+${4 * 512 - ((size + 1000) % 512)} bytes) is outside the image file`);
});

test('hostile qcow2: snapshot table overlapping the L1 table', async (t) => {
  const p = await freshImage(t);
  poke(p, 60, u32(1));
  poke(p, 64, u64(BigInt(l1Offset(p))));
  await openExpect(p, CorruptImageError, 'qcow2 header: snapshot table overlaps the L1 table');
});

test('hostile qcow2: refcount block overlapping the L1 table', async (t) => {
  const p = await freshImage(t);
  const rt = Number(peek(p, 48, 8).readBigUInt64BE(0));
  poke(p, rt, u64(BigInt(l1Offset(p))));
  await openExpect(p, CorruptImageError, `qcow2: refcount block 0 at ${l1Offset(p)} overlaps the L1 table`);
});

test('hostile qcow2: header extension running past the cluster', async (t) => {
  const p = await freshImage(t, false);
  const hdr = peek(p, 0, 4096);
  const pos = hdr.indexOf(Buffer.from([0x68, 0x03, 0xf8, 0x57]));
  poke(p, pos + 4, u32(0x7fffffff));
  await openExpect(p, CorruptImageError, /^qcow2 header: extension 0x6803f857 length 2147483647 runs past the first cluster$/);
});

test('hostile qcow2: truncated file and bad magic', async (t) => {
  const p = await freshImage(t, false);
  poke(p, 0, Buffer.from('QFI\xfc', 'latin1'));
  await openExpect(p, CorruptImageError, 'qcow2 header: bad magic');
  const p2 = join(tempDir(t), 'short.qcow2');
  const fd = openSync(p2, 'w');
  writeSync(fd, Buffer.from('QFI\xfb', 'latin1'));
  closeSync(fd);
  await openExpect(p2, CorruptImageError, 'qcow2 header: file too short');
});

test('hostile qcow2: corruption found while writing sets the corrupt bit and stops further writes', async (t) => {
  const p = await freshImage(t);
  const l2 = Number(peek(p, l1Offset(p), 8).readBigUInt64BE(0) & ((1n << 56n) - 1n));
  // Guest cluster 1 points into the refcount table.
  poke(p, l2 + 8, u64((1n << 63n) | peek(p, 48, 8).readBigUInt64BE(0)));
  const dev = await Qcow2Device.open(await HostFile.open(p));
  await assert.rejects(dev.pwrite(Buffer.alloc(10, 1), CS + 5), (e: unknown) => e instanceof CorruptImageError && /inside the refcount table/.test((e as Error).message));
  await assert.rejects(dev.pwrite(Buffer.alloc(10, 1), 0), /found corrupt/);
  const b = Buffer.alloc(10);
  await dev.pread(b, 0);
  assert.ok(b.equals(Buffer.alloc(10, 0x42)), 'reads of intact clusters still work');
  await dev.close();
  assert.equal(peek(p, 72, 8).readBigUInt64BE(0) & 2n, 2n, 'corrupt bit set on disk');
  await openExpect(p, UnsupportedImageError, 'qcow2: the image is marked corrupt; it can only be opened read-only', false);
});

test('hostile qcow2: a backing chain that loops onto itself ends with an error', async (t) => {
  const { openImage } = await import('../../src/formats/open.js');
  const dir = tempDir(t);
  const p = join(dir, 'self.qcow2');
  await createQcow2(p, { sizeBytes: 1 << 20, backingFile: 'self.qcow2', backingFormat: 'qcow2' });
  await assert.rejects(openImage(p, { readOnly: true }), (e: unknown) => e instanceof UnsupportedImageError && /loops back|backing chain deeper than 64/.test((e as Error).message));
  await assert.rejects(openImage(p, { readOnly: true, allowBacking: false }), (e: unknown) => e instanceof UnsupportedImageError && /backing files are not allowed/.test((e as Error).message));
});
