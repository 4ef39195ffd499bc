// compare's exit codes and messages against qemu-img compare on the same pairs, and measure's
// numbers against qemu-img measure (equal, for raw and qcow2 targets, sizes and sources).

import assert from 'node:assert/strict';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';
import { runImgbd } from './qcow2-cli-helpers.js';
import { MiB, writeMixedRaw } from './toolbox-helpers.js';

test('compare: the same exit code and message as qemu-img compare', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const a = join(dir, 'a.raw');
  writeMixedRaw(a, 8);
  const p = (n: string): string => join(dir, n);
  await runOk('qemu-img', ['convert', '-O', 'qcow2', a, p('a.qcow2')]);
  await runOk('qemu-img', ['convert', '-O', 'vdi', a, p('a.vdi')]);
  copyFileSync(a, p('flip.raw'));
  await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x41 5000123 1', p('flip.raw')]);
  // Larger by zeros, larger by data, and a hole turned into data.
  await runOk('qemu-img', ['convert', '-O', 'qcow2', a, p('big0.qcow2')]);
  await runOk('qemu-img', ['resize', p('big0.qcow2'), '12M']);
  copyFileSync(p('big0.qcow2'), p('big1.qcow2'));
  await runOk('qemu-io', ['-c', 'write -P 7 10M 4k', p('big1.qcow2')]);
  copyFileSync(a, p('hole.raw'));
  await runOk('qemu-io', ['-f', 'raw', '-c', `write -P 3 ${3 * MiB + 1024} 512`, p('hole.raw')]);
  const pairs: [string[], string][] = [
    [[a, p('a.qcow2')], 'identical across formats'],
    [[p('a.qcow2'), p('a.vdi')], 'qcow2 against vdi'],
    [[a, p('flip.raw')], 'one byte differs'],
    [[a, p('hole.raw')], 'data in a hole'],
    [[p('a.qcow2'), p('big0.qcow2')], 'larger by zeros'],
    [[p('big1.qcow2'), a], 'larger by data'],
    [['-s', p('a.qcow2'), p('big0.qcow2')], 'strict, sizes differ'],
    [[a, p('missing.raw')], 'missing file'],
  ];
  for (const [args, what] of pairs) {
    const ours = await runImgbd(['compare', ...args]);
    const theirs = await run('qemu-img', ['compare', ...args]);
    assert.equal(ours.code, theirs.code, `${what}: imgbd ${ours.code} (${ours.stdout}${ours.stderr}) qemu-img ${theirs.code} (${theirs.stdout})`);
    if (theirs.code !== 2) assert.equal(ours.stdout, theirs.stdout, what);
  }
});

test('measure: the same numbers as qemu-img measure', async (t) => {
  if (!requirePeers(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const a = join(dir, 'a.raw');
  writeMixedRaw(a, 24);
  await runOk('qemu-img', ['convert', '-O', 'qcow2', a, join(dir, 'a.qcow2')]);
  await runOk('qemu-img', ['convert', '-c', '-O', 'qcow2', a, join(dir, 'c.qcow2')]);
  const cases: string[][] = [
    ['--size', '1G', '-O', 'qcow2'],
    ['--size', '100G', '-O', 'qcow2', '-o', 'cluster_size=4k'],
    ['--size', '10G', '-O', 'qcow2', '-o', 'extended_l2=on,refcount_bits=1'],
    ['--size', '7T', '-O', 'qcow2', '-o', 'cluster_size=2M,refcount_bits=64'],
    ['--size', '12345', '-O', 'raw'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'preallocation=full'],
    ['-O', 'qcow2', a],
    ['-O', 'qcow2', '-o', 'cluster_size=512', a],
    ['-O', 'qcow2', '-o', 'cluster_size=2M', a],
    ['-O', 'qcow2', '-o', 'compat=0.10', join(dir, 'a.qcow2')],
    ['-O', 'qcow2', join(dir, 'c.qcow2')],
    ['-O', 'raw', join(dir, 'a.qcow2')],
  ];
  for (const args of cases) {
    const ours = await runImgbd(['measure', '--output=json', ...args]);
    assert.equal(ours.code, 0, ours.stderr);
    const theirs = JSON.parse(await runOk('qemu-img', ['measure', '--output=json', ...args])) as Record<string, number>;
    assert.deepEqual(JSON.parse(ours.stdout), theirs, args.join(' '));
  }
  const human = await runImgbd(['measure', '--size', '1G', '-O', 'qcow2']);
  assert.equal(human.stdout, await runOk('qemu-img', ['measure', '--size', '1G', '-O', 'qcow2']));
});
