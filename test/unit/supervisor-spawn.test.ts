// The real supervisor process on a host without the nbd driver: spawned in its own session,
// it reports over the readiness pipe, and every failure leaves nothing behind (no state
// file, no log, no process). A usage error found by the supervisor (a partition that does
// not exist) comes back as a UsageError, before any device is touched.

import assert from 'node:assert/strict';
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { UsageError } from '../../src/errors.js';
import { attachImage } from '../../src/kernel/attach.js';
import { SupervisorError } from '../../src/kernel/supervisor-protocol.js';
import { tempDir } from '../helpers/peers.js';

const hasNbd = existsSync('/sys/block/nbd0') || existsSync('/sys/module/nbd');

test('no partition table: IMAGE:1 is a usage error and nothing is left', { timeout: 60_000 }, async (t) => {
  const dir = tempDir(t);
  const image = join(dir, 'blank.img');
  writeFileSync(image, Buffer.alloc(1 << 20));
  await assert.rejects(attachImage({ image, partition: 1, runDir: join(dir, 'run') }), (e: unknown) => e instanceof UsageError && /no partition 1/.test((e as Error).message));
  assert.deepEqual(readdirSync(join(dir, 'run')), []);
});

test('no nbd driver: the supervisor reports why and leaves nothing', { timeout: 60_000 }, async (t) => {
  if (hasNbd) return t.skip('this host has the nbd driver: the VM tests cover attaching');
  const dir = tempDir(t);
  const image = join(dir, 'disk.img');
  writeFileSync(image, Buffer.alloc(1 << 20));
  await assert.rejects(attachImage({ image, runDir: join(dir, 'run') }), (e: unknown) => {
    assert.ok(e instanceof SupervisorError, String(e));
    // netlink family missing, then no /dev/nbdN for the ioctl fallback.
    assert.equal(e.code, 'ERR_NO_FREE_DEVICE');
    return true;
  });
  // Only the ioctl fallback's lock file: no state, no log.
  assert.deepEqual(readdirSync(join(dir, 'run')), ['ioctl-attach.lock']);
});

test('the netlink interface alone fails with the missing family', { timeout: 60_000 }, async (t) => {
  if (hasNbd) return t.skip('this host has the nbd driver');
  const dir = tempDir(t);
  const image = join(dir, 'disk.img');
  writeFileSync(image, Buffer.alloc(1 << 20));
  await assert.rejects(attachImage({ image, runDir: join(dir, 'run'), interface: 'netlink' }), { code: 'ENOENT' });
  assert.deepEqual(readdirSync(join(dir, 'run')), []);
});
