// Files on tmpfs are read and written on the calling thread (HostFile.inMemory); files elsewhere
// keep the thread pool. Both paths must give the same bytes, zeros past the end of file included.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { HostFile } from '../../src/io/host-file.js';
import { openRaw } from '../../src/formats/raw/driver.js';
import { tempDir } from '../helpers/peers.js';

function shmDir(t: { after: (fn: () => void) => void }): string {
  const dir = mkdtempSync('/dev/shm/imgbd-test-');
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test('a file on tmpfs is in memory, one on the test directory is not, and both read and write alike', async (t) => {
  for (const [dir, inMemory] of [[shmDir(t), true], [tempDir(t), false]] as const) {
    const path = join(dir, 'f.bin');
    const data = randomBytes(10000);
    writeFileSync(path, data);
    const f = await HostFile.open(path);
    try {
      assert.equal(f.inMemory, inMemory, dir);
      const buf = Buffer.alloc(4096, 0xaa);
      await f.pread(buf, 8000);
      assert.deepEqual(buf.subarray(0, 2000), data.subarray(8000));
      assert.deepEqual(buf.subarray(2000), Buffer.alloc(2096), 'zeros past the end of file');
      const more = randomBytes(5000);
      await f.pwrite(more, 9000);
      assert.equal(await f.size(), 14000);
      await f.datasync();
      assert.deepEqual(readFileSync(path).subarray(9000), more);
    } finally {
      await f.close();
    }
  }
});

test('a raw image on tmpfs: writes land before they resolve, reads see them, errors still reject', async (t) => {
  const path = join(shmDir(t), 'disk.raw');
  writeFileSync(path, Buffer.alloc(1 << 20));
  const raw = await openRaw(path);
  t.after(() => raw.close());
  const data = randomBytes(256 * 1024);
  await raw.pwrite(data, 65536);
  assert.deepEqual(readFileSync(path).subarray(65536, 65536 + data.length), data);
  const back = Buffer.alloc(data.length);
  assert.equal(raw.readNow(back, 65536), true);
  assert.deepEqual(back, data);
  await assert.rejects(raw.pwrite(Buffer.alloc(4096), (1 << 20) - 100));
  const ro = await HostFile.open(path, { readOnly: true });
  t.after(() => ro.close());
  await assert.rejects(ro.pwrite(Buffer.alloc(1), 0), /read-only/);
});
