// The qemu-nbd drop-in's command line, without a kernel: --install-shim links bin/qemu-nbd
// and never replaces a real file; the shim itself runs `imgbd qemu-nbd`; arguments qemu-nbd
// would refuse are refused (exit 64) before any device is touched.

import assert from 'node:assert/strict';
import { existsSync, lstatSync, readlinkSync, realpathSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { installShim } from '../../src/cli/commands/qemu-nbd.js';
import { repoRoot, run, tempDir } from '../helpers/peers.js';

test('--install-shim makes DIR/qemu-nbd a symlink to bin/qemu-nbd, replacing only symlinks', (t) => {
  const dir = tempDir(t, 'imgbd-shim-');
  const link = installShim(join(dir, 'bin'));
  assert.equal(link, join(dir, 'bin', 'qemu-nbd'));
  assert.ok(lstatSync(link).isSymbolicLink());
  assert.equal(realpathSync(link), realpathSync(join(repoRoot(), 'bin', 'qemu-nbd')));
  // Again: the old link is replaced.
  installShim(join(dir, 'bin'));
  assert.equal(readlinkSync(link), realpathSync(join(repoRoot(), 'bin', 'qemu-nbd')));
  writeFileSync(join(dir, 'qemu-nbd'), '#!/bin/sh\n');
  assert.throws(() => installShim(dir), { code: 'ERR_USAGE' });
  assert.ok(existsSync(join(dir, 'qemu-nbd')) && !lstatSync(join(dir, 'qemu-nbd')).isSymbolicLink());
});

test('the shim, called through a symlink with a minimal PATH, runs imgbd qemu-nbd and refuses bad arguments', async (t) => {
  const dir = tempDir(t, 'imgbd-shim-');
  const link = installShim(dir);
  const env = { PATH: dir, IMGBD_SHIM_MODE: 'ts' };
  const cases: Array<[string[], RegExp]> = [
    [['-c', '/dev/nbd0'], /usage: qemu-nbd -c/],
    [['-c', '/dev/sda', 'x.img'], /not an nbd device/],
    [['-c', '/dev/nbd0p1', 'x.img'], /not an nbd device/],
    [['-d'], /usage: qemu-nbd -d/],
    [['-c', '/dev/nbd0', '-d', '/dev/nbd0'], /exclusive/],
    [['x.img'], /only qemu-nbd -c/],
  ];
  for (const [args, message] of cases) {
    const r = await run(link, args, { env });
    assert.equal(r.code, 64, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, message, args.join(' '));
  }
});
