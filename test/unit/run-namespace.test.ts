// Pure parts of `imgbd run`: the container environment and glibc's makedev() encoding
// (goldens from Python's os.makedev, which calls glibc's).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { containerEnv, DEFAULT_PATH } from '../../src/container/run.js';
import { CONTAINER_DEVICES } from '../../src/container/rootfs.js';
import { makeDev } from '../../src/sys/namespace.js';

test('makeDev matches glibc makedev()', () => {
  assert.equal(makeDev(1, 3), 0x103n);
  assert.equal(makeDev(5, 0), 0x500n);
  assert.equal(makeDev(259, 0x12345), 0x12310345n);
  assert.equal(makeDev(0x12345, 0x678), 0x1200000634578n);
});

test('the container gets exactly the OCI default character devices', () => {
  assert.deepEqual(
    CONTAINER_DEVICES.map(([n, ma, mi]) => `${n}:${ma}:${mi}`),
    ['null:1:3', 'zero:1:5', 'full:1:7', 'random:1:8', 'urandom:1:9', 'tty:5:0'],
  );
});

test('containerEnv: fixed base, TERM passed on, -e entries override and add', () => {
  assert.deepEqual(containerEnv([], undefined), [`PATH=${DEFAULT_PATH}`, 'HOME=/root', 'container=imgbd']);
  assert.deepEqual(containerEnv(['HOME=/home/u', 'A=b=c', 'E='], 'xterm'), [`PATH=${DEFAULT_PATH}`, 'HOME=/home/u', 'container=imgbd', 'TERM=xterm', 'A=b=c', 'E=']);
  for (const bad of ['NOEQ', '=v', 'A=\0']) assert.throws(() => containerEnv([bad], undefined), { code: 'ERR_USAGE' }, bad);
});
