// The ioctl numbers, checked two independent ways: against the (type, nr, size) that
// /usr/include/linux/fs.h declares, decoded with the bit layout of asm-generic/ioctl.h, and
// against the well-known hex values (e.g. BLKGETSIZE64 = 0x80081272, as strace prints it).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { BLKDISCARD, BLKGETSIZE64, BLKPBSZGET, BLKSSZGET, BLKZEROOUT } from '../../src/sys/ioctl-numbers.js';

test('ioctl numbers match the hex values strace and the kernel docs print', () => {
  assert.equal(BLKSSZGET, 0x1268);
  assert.equal(BLKGETSIZE64, 0x80081272);
  assert.equal(BLKDISCARD, 0x1277);
  assert.equal(BLKPBSZGET, 0x127b);
  assert.equal(BLKZEROOUT, 0x127f);
});

test('ioctl numbers decode to the declarations in linux/fs.h', (t) => {
  const header = '/usr/include/linux/fs.h';
  if (!existsSync(header)) {
    t.skip(`${header} is not installed`);
    return;
  }
  const text = readFileSync(header, 'utf8');
  const ours: Record<string, number> = { BLKSSZGET, BLKGETSIZE64, BLKDISCARD, BLKPBSZGET, BLKZEROOUT };
  for (const [name, value] of Object.entries(ours)) {
    const m = new RegExp(`#define\\s+${name}\\s+_IO(R?)\\((0x[0-9a-f]+|\\d+),\\s*(\\d+)(?:,\\s*(\\w+))?\\)`, 'i').exec(text);
    assert.ok(m, `${name} is declared in ${header}`);
    const dir = m[1] === 'R' ? 2 : 0;
    const type = Number(m[2]);
    const nr = Number(m[3]);
    const size = m[4] === undefined ? 0 : m[4] === 'size_t' ? 8 : NaN;
    assert.equal(value & 0xff, nr, `${name} nr`);
    assert.equal((value >>> 8) & 0xff, type, `${name} type`);
    assert.equal((value >>> 16) & 0x3fff, size, `${name} size`);
    assert.equal(value >>> 30, dir, `${name} direction`);
  }
});
