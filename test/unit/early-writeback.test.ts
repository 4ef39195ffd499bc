// EarlyWriteback only starts the kernel's writeback; what it must get right is its descriptor:
// kicks while one is running are dropped, close() waits for the running one and closes it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { EarlyWriteback } from '../../src/io/early-writeback.js';
import { tempDir } from '../helpers/peers.js';

const openFds = (): number => readdirSync('/proc/self/fd').length;

test('early writeback of a file being filled: kicks, then close leaves no descriptor behind', async (t) => {
  const path = join(tempDir(t), 'target.raw');
  writeFileSync(path, randomBytes(4 << 20));
  const before = openFds();
  const wb = await EarlyWriteback.open(path);
  assert.ok(wb !== null);
  assert.equal(openFds(), before + 1);
  for (let i = 0; i < 5; i++) wb.kick();
  await wb.close();
  wb.kick();
  assert.equal(openFds(), before);
  assert.equal(await EarlyWriteback.open(join(tempDir(t), 'missing')), null);
});
