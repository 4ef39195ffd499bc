// mount(8)-style -o strings turned into mount(2) flags and data (src/sys/mount.ts).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MS, parseMountOptions } from '../../src/sys/mount.js';

test('flag options become MS_* bits, the rest is the filesystem data string in order', () => {
  assert.deepEqual(parseMountOptions('noatime,nodev,errors=remount-ro,nosuid,data=ordered', false), {
    flags: MS.NOATIME | MS.NODEV | MS.NOSUID,
    data: 'errors=remount-ro,data=ordered',
  });
  assert.deepEqual(parseMountOptions(undefined, false), { flags: 0, data: '' });
  assert.deepEqual(parseMountOptions(' , defaults ,', false), { flags: 0, data: '' });
});

test('later options override earlier ones, as mount(8) does', () => {
  assert.equal(parseMountOptions('ro,rw', false).flags, 0);
  assert.equal(parseMountOptions('noexec,exec,nosuid', false).flags, MS.NOSUID);
  assert.equal(parseMountOptions('atime,noatime', false).flags, MS.NOATIME);
});

test('a read-only attach forces ro and refuses an explicit rw', () => {
  assert.equal(parseMountOptions('noatime', true).flags, MS.NOATIME | MS.RDONLY);
  assert.equal(parseMountOptions(undefined, true).flags, MS.RDONLY);
  assert.throws(() => parseMountOptions('rw', true), { code: 'ERR_USAGE' });
});

test('options that change what mount does are refused', () => {
  for (const opt of ['remount', 'bind', 'move', 'loop', 'shared']) {
    assert.throws(() => parseMountOptions(`noatime,${opt}`, false), { code: 'ERR_USAGE' }, opt);
  }
});
