// Write-back metadata in the qcow2 driver: allocating writes cost no fdatasync of their own, a
// FLUSH costs a small constant number, nothing new is referenced on disk before the FLUSH, and
// at every point the on-disk image is consistent (leaks at worst).

import assert from 'node:assert/strict';
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { createQcow2 } from '../../src/formats/qcow2/create.js';
import { Qcow2Device } from '../../src/formats/qcow2/driver.js';
import { HostFile } from '../../src/io/host-file.js';
import { tempDir } from '../helpers/peers.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Opens `path` writable, counting the fdatasync calls made on it. */
async function openCounting(path: string, opts: { l2CacheBytes?: number } = {}): Promise<{ dev: Qcow2Device; syncs: () => number }> {
  const file = await HostFile.open(path);
  let n = 0;
  const orig = file.datasync.bind(file);
  file.datasync = async () => {
    n++;
    await orig();
  };
  return { dev: await Qcow2Device.open(file, opts), syncs: () => n };
}

function pattern(i: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  for (let p = 0; p < len; p += 512) b.writeUInt32BE(i * 1000 + p / 512 + 1, p);
  return b;
}

/** A snapshot of the file as it is on disk now, opened read-only and checked. */
async function onDisk(t: Parameters<typeof tempDir>[0], path: string): Promise<Qcow2Device> {
  const copy = join(tempDir(t), 'copy.qcow2');
  await copyFile(path, copy);
  return Qcow2Device.open(await HostFile.open(copy, { readOnly: true }));
}

test('qcow2 write-back: 1000 allocating 64 KiB writes then FLUSH cost a constant number of fdatasyncs', async (t) => {
  const path = join(tempDir(t), 'a.qcow2');
  await createQcow2(path, { sizeBytes: 128 * MiB });
  const { dev, syncs } = await openCounting(path);
  t.after(() => dev.close());
  const before = syncs();
  for (let i = 0; i < 1000; i++) await dev.pwrite(pattern(i, 64 * KiB), i * 64 * KiB);
  const writes = syncs() - before;
  await dev.flush();
  const total = syncs() - before;
  assert.ok(writes <= 4, `${writes} fdatasyncs during 1000 allocating writes`);
  assert.ok(total <= 8, `${total} fdatasyncs for 1000 allocating writes and a FLUSH`);
  const back = Buffer.alloc(64 * KiB);
  for (const i of [0, 1, 500, 999]) {
    await dev.pread(back, i * 64 * KiB);
    assert.ok(back.equals(pattern(i, 64 * KiB)), `cluster ${i}`);
  }
});

test('qcow2 write-back: new mappings reach the disk on FLUSH, and the image is consistent before and after', async (t) => {
  const path = join(tempDir(t), 'b.qcow2');
  await createQcow2(path, { sizeBytes: 64 * MiB });
  const { dev } = await openCounting(path);
  t.after(() => dev.close());
  for (let i = 0; i < 40; i++) await dev.pwrite(pattern(i, 64 * KiB), i * 3 * 64 * KiB);

  const early = await onDisk(t, path);
  const got = Buffer.alloc(64 * KiB);
  await early.pread(got, 0);
  assert.ok(got.equals(Buffer.alloc(64 * KiB)), 'no L1/L2 entry is on disk before the FLUSH');
  const c1 = await early.check();
  assert.equal(c1.corruptions, 0, c1.messages.join('\n'));
  await early.close();

  await dev.flush();
  const late = await onDisk(t, path);
  for (let i = 0; i < 40; i++) {
    await late.pread(got, i * 3 * 64 * KiB);
    assert.ok(got.equals(pattern(i, 64 * KiB)), `cluster ${i * 3} is on disk after the FLUSH`);
  }
  const c2 = await late.check();
  assert.deepEqual([c2.corruptions, c2.leaks], [0, 0], c2.messages.join('\n'));
  await late.close();
});

test('qcow2 write-back: a FUA write is on disk when acknowledged', async (t) => {
  const path = join(tempDir(t), 'c.qcow2');
  await createQcow2(path, { sizeBytes: 16 * MiB });
  const { dev } = await openCounting(path);
  t.after(() => dev.close());
  await dev.pwrite(pattern(7, 4096), 5 * MiB, { fua: true });
  const img = await onDisk(t, path);
  const got = Buffer.alloc(4096);
  await img.pread(got, 5 * MiB);
  assert.ok(got.equals(pattern(7, 4096)));
  await img.close();
});

test('qcow2 write-back: a small L2 cache stays consistent under eviction, trims free only after the clearing entry is written', async (t) => {
  const path = join(tempDir(t), 'd.qcow2');
  await createQcow2(path, { sizeBytes: 256 * MiB, clusterSize: 4096 });
  // Two tables of 512 entries: writes spread over many tables force dirty evictions.
  const { dev } = await openCounting(path, { l2CacheBytes: 2 * 4096 });
  t.after(() => dev.close());
  const spots: number[] = [];
  for (let i = 0; i < 300; i++) spots.push(((i * 7919) % 65536) * 4096);
  for (const [i, off] of spots.entries()) await dev.pwrite(pattern(i, 4096), off);
  for (const off of spots.slice(0, 100)) await dev.trim(off, 4096);
  const mid = await onDisk(t, path);
  const c1 = await mid.check();
  assert.equal(c1.corruptions, 0, c1.messages.join('\n'));
  await mid.close();
  await dev.flush();
  const got = Buffer.alloc(4096);
  const end = await onDisk(t, path);
  for (const [i, off] of spots.entries()) {
    await end.pread(got, off);
    assert.ok(got.equals(i < 100 ? Buffer.alloc(4096) : pattern(i, 4096)), `write ${i}`);
  }
  const c2 = await end.check();
  assert.deepEqual([c2.corruptions, c2.leaks], [0, 0], c2.messages.join('\n'));
  await end.close();
});
