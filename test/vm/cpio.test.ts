// The initramfs writer against GNU cpio: it must list and extract exactly what was encoded
// (the kernel's unpacker and cpio read the same newc format).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { lstatSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { requirePeers, run, tempDir } from '../helpers/peers.js';
import { encodeCpioNewc } from './cpio.js';

test('newc archive lists and extracts with GNU cpio', async (t) => {
  if (!requirePeers(t, 'cpio')) return;
  const dir = tempDir(t);
  const odd = Buffer.from('three'); // lengths that are not multiples of 4 exercise the padding
  const big = Buffer.alloc(70_001, 0x5a);
  const archive = encodeCpioNewc([
    { kind: 'dir', path: 'bin' },
    { kind: 'file', path: 'bin/tool', data: odd, mode: 0o755 },
    { kind: 'symlink', path: 'bin/alias', target: 'tool' },
    { kind: 'dir', path: 'data', mode: 0o700 },
    { kind: 'file', path: 'data/blob.bin', data: big },
    { kind: 'file', path: 'empty', data: new Uint8Array(0) },
  ]);
  assert.equal(archive.length % 4, 0);

  const list = await run('cpio', ['-it', '--quiet'], { input: archive });
  assert.equal(list.code, 0, list.stderr);
  assert.deepEqual(list.stdout.trim().split('\n'), ['bin', 'bin/tool', 'bin/alias', 'data', 'data/blob.bin', 'empty']);

  const out = join(dir, 'x');
  const ex = await run('sh', ['-c', `mkdir -p ${out} && cd ${out} && cpio -idm --quiet`], { input: archive });
  assert.equal(ex.code, 0, ex.stderr);
  assert.deepEqual(readFileSync(join(out, 'bin/tool')), odd);
  assert.equal(lstatSync(join(out, 'bin/tool')).mode & 0o777, 0o755);
  assert.equal(readlinkSync(join(out, 'bin/alias')), 'tool');
  assert.equal(lstatSync(join(out, 'data')).mode & 0o777, 0o700);
  assert.deepEqual(readFileSync(join(out, 'data/blob.bin')), big);
  assert.equal(readFileSync(join(out, 'empty')).length, 0);
});

test('newc writer refuses absolute paths', () => {
  assert.throws(() => encodeCpioNewc([{ kind: 'dir', path: '/bin' }]), RangeError);
});
