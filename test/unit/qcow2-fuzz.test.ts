// Seeded mutation fuzzing of qcow2 metadata: random bytes poked into the header, refcount
// structures, L1 and L2 tables of a small image. Opening, reading, extents, writing and checking
// must either work or fail with one of our error classes: never a TypeError/RangeError, never a hang.

import assert from 'node:assert/strict';
import { copyFileSync, openSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { ImgbdError } from '../../src/errors.js';
import { createQcow2 } from '../../src/formats/qcow2/create.js';
import { Qcow2Device } from '../../src/formats/qcow2/driver.js';
import { HostFile } from '../../src/io/host-file.js';
import { tempDir } from '../helpers/peers.js';
import { prng } from '../fixtures/qcow2/helpers.js';

const CS = 4096;

async function exercise(path: string, readOnly: boolean): Promise<void> {
  const dev = await Qcow2Device.open(await HostFile.open(path, { readOnly }), { readOnly });
  try {
    const size = Math.min(dev.sizeBytes, 1 << 20);
    const b = Buffer.alloc(size);
    await dev.pread(b, 0).catch(expectOurs);
    await dev.extents(0, size).catch(expectOurs);
    await dev.allocationDepth(0, size).catch(expectOurs);
    if (!readOnly) {
      await dev.pwrite(Buffer.alloc(9000, 0x5a), 3000).catch(expectOurs);
      await dev.zero(CS * 3, CS * 2, { mayTrim: true }).catch(expectOurs);
      await dev.trim(CS * 8, CS * 4).catch(expectOurs);
      await dev.check('leaks').catch(expectOurs);
    } else {
      await dev.check('none').catch(expectOurs);
    }
  } finally {
    await dev.close().catch(expectOurs);
  }
}

function expectOurs(err: unknown): void {
  if (err instanceof ImgbdError) return;
  throw err;
}

test('qcow2 fuzz: 300 mutated images fail cleanly or work', async (t) => {
  const dir = tempDir(t);
  const base = join(dir, 'base.qcow2');
  await createQcow2(base, { sizeBytes: 1 << 20, clusterSize: CS, refcountBits: 16 });
  {
    const dev = await Qcow2Device.open(await HostFile.open(base));
    for (let i = 0; i < 40; i++) await dev.pwrite(Buffer.alloc(3000, i + 1), i * 20011);
    await dev.close();
  }
  const rnd = prng(2024);
  const path = join(dir, 'm.qcow2');
  // Metadata lives in the first few clusters: header, refcount table and block, L1, L2.
  const hot = [0, 8, 16, 20, 24, 36, 40, 48, 56, 60, 64, 72, 96, 100, CS, CS + 8, 2 * CS, 2 * CS + 2, 3 * CS, 4 * CS, 4 * CS + 8, 4 * CS + 16];
  for (let i = 0; i < 300; i++) {
    copyFileSync(base, path);
    const fd = openSync(path, 'r+');
    const pokes = 1 + Math.floor(rnd() * 4);
    for (let k = 0; k < pokes; k++) {
      // A third on header fields, the rest on refcount block, L1 and L2 tables (entry aligned).
      const at = rnd() < 0.33 ? hot[Math.floor(rnd() * hot.length)]! + Math.floor(rnd() * 8) : 2 * CS + Math.floor(rnd() * 3 * CS / 8) * 8 + (rnd() < 0.5 ? 0 : Math.floor(rnd() * 8));
      const bytes = Buffer.alloc(1 + Math.floor(rnd() * 8));
      for (let j = 0; j < bytes.length; j++) bytes[j] = rnd() < 0.3 ? 0xff : Math.floor(rnd() * 256);
      writeSync(fd, bytes, 0, bytes.length, at);
    }
    closeSync(fd);
    for (const ro of [true, false]) {
      try {
        await exercise(path, ro);
      } catch (err) {
        if (!(err instanceof ImgbdError) && !(err instanceof Error && 'code' in err && typeof (err as { code: unknown }).code === 'string' && /^E[A-Z]+$/.test((err as { code: string }).code))) {
          assert.fail(`iteration ${i} (${ro ? 'ro' : 'rw'}): ${(err as Error).stack}`);
        }
      }
    }
  }
});
