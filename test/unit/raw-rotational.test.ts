// dev_t decoding for the sysfs rotational lookup, against glibc's gnu_dev_makedev layout
// (minor bits 0-7 and 20-31, major bits 8-19 and 32-43), and against a real device node.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, statSync } from 'node:fs';
import { splitDevT } from '../../src/sys/rotational.js';

test('splitDevT inverts gnu_dev_makedev', () => {
  assert.deepEqual(splitDevT(0x0700), { major: 7, minor: 0 });
  assert.deepEqual(splitDevT(0x10303), { major: 259, minor: 3 });
  // minor 300 = 0x12c: low byte in bits 0-7, the rest from bit 20.
  assert.deepEqual(splitDevT(0x10082c), { major: 8, minor: 300 });
  // makedev(4096, 1): (4096 & 0xfffff000) << 32 | 1.
  assert.deepEqual(splitDevT(2 ** 44 + 1), { major: 4096, minor: 1 });
  // makedev(0, 0x100000): (0x100000 & 0xffffff00) << 12 = 2^32.
  assert.deepEqual(splitDevT(2 ** 32), { major: 0, minor: 0x100000 });
  // makedev(0x12345, 0xabcdef) = 0x1200abcd345ef (computed with the C macro's formula).
  assert.deepEqual(splitDevT(0x1200abcd345ef), { major: 0x12345, minor: 0xabcdef });
});

test('splitDevT agrees with a device node and its sysfs entry', (t) => {
  if (!existsSync('/dev/null') || !existsSync('/sys/dev/char/1:3')) {
    t.skip('no /dev/null or sysfs');
    return;
  }
  assert.deepEqual(splitDevT(statSync('/dev/null').rdev), { major: 1, minor: 3 });
});
