// HostFile.reserve allocates the blocks a write is about to fill, on ext4 and XFS, where the
// file may have holes: anywhere in a sparse file, past the end of one allocated throughout, and
// in it again once a range is punched.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { statfsSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { HostFile } from '../../src/io/host-file.js';
import { FileZeroing } from '../../src/io/file-zeroing.js';
import { EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC } from '../../src/sys/fs-magic.js';
import { tempDir } from '../helpers/peers.js';

const MiB = 1024 * 1024;
const allocated = (path: string): number => statSync(path).blocks * 512;

test('blocks are reserved in a sparse file, past the end of a full one, and in it once a range is punched', async (t) => {
  const dir = tempDir(t);
  const type = Number(statfsSync(dir).type);
  if (type !== EXT4_SUPER_MAGIC && type !== XFS_SUPER_MAGIC) {
    assert.ok(!process.env.CI, `the test directory must be on ext4 or XFS in CI (type 0x${type.toString(16)})`);
    t.skip('not ext4 or XFS');
    return;
  }
  const sparse = join(dir, 'sparse.raw');
  writeFileSync(sparse, '');
  const s = await HostFile.open(sparse);
  try {
    await s.truncate(8 * MiB);
    s.reserve(2 * MiB, 2 * MiB);
    assert.ok(allocated(sparse) >= 2 * MiB, `reserved: ${allocated(sparse)} bytes allocated`);
    assert.equal(statSync(sparse).size, 8 * MiB, 'the size is kept');
    s.reserve(6 * MiB, 512 * 1024);
    assert.ok(allocated(sparse) < 3 * MiB, 'below 1 MiB nothing is reserved');
  } finally {
    await s.close();
  }

  const full = join(dir, 'full.raw');
  writeFileSync(full, Buffer.alloc(8 * MiB, 1));
  const f = await HostFile.open(full);
  try {
    f.reserve(8 * MiB, 2 * MiB);
    assert.ok(allocated(full) >= 10 * MiB, `reserved past the end, where the file grows: ${allocated(full)}`);
    assert.equal(statSync(full).size, 8 * MiB);
    const zeroing = new FileZeroing(f);
    assert.equal(await zeroing.punch(0, 4 * MiB), true);
    const punched = allocated(full);
    assert.ok(punched <= 6 * MiB + 64 * 1024, `punched: ${punched}`);
    f.reserve(0, 4 * MiB);
    assert.ok(allocated(full) >= 10 * MiB, `reserved again after the punch: ${allocated(full)}`);
  } finally {
    await f.close();
  }
});
