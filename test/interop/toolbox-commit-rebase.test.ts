// commit and rebase against QEMU on twin images: the same qemu-io workload on two copies, one
// handled by imgbd and the other by qemu-img; base, overlay and guest view must compare equal,
// and every image must check clean. qcow2 and qed overlays, raw and qcow2 backing files.

import assert from 'node:assert/strict';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { requirePeers, runOk, tempDir } from '../helpers/peers.js';
import { runImgbdOk, runImgbd } from './qcow2-cli-helpers.js';
import { qemuCheckClean, qemuCompare, qemuMapJson } from './toolbox-helpers.js';

const SIZE = String(32 * 1024 * 1024);

async function io(path: string, format: string, ...cmds: string[]): Promise<void> {
  await runOk('qemu-io', ['-f', format, ...cmds.flatMap((c) => ['-c', c]), path]);
}

/** Two identical chains in `dir`: base.<bf> <- top.<tf>, suffixes a (imgbd) and b (qemu-img). */
async function twins(dir: string, baseFormat: string, topFormat: string): Promise<{ base: [string, string]; top: [string, string] }> {
  const base: [string, string] = [join(dir, `base-a.${baseFormat}`), join(dir, `base-b.${baseFormat}`)];
  const top: [string, string] = [join(dir, `top-a.${topFormat}`), join(dir, `top-b.${topFormat}`)];
  await runOk('qemu-img', ['create', '-f', baseFormat, base[0], SIZE]);
  await io(base[0], baseFormat, 'write -P 1 0 8M', 'write -P 2 16M 4M', 'write -P 6 31M 1M');
  copyFileSync(base[0], base[1]);
  for (let i = 0; i < 2; i++) {
    await runOk('qemu-img', ['create', '-f', topFormat, '-b', base[i]!, '-F', baseFormat, top[i]!]);
    await io(top[i]!, topFormat, 'write -P 3 1M 2M', 'write -z 17M 1M', 'write -P 4 30M 64k', 'write -P 5 100k 3k');
  }
  return { base, top };
}

for (const [bf, tf] of [
  ['qcow2', 'qcow2'],
  ['raw', 'qcow2'],
  ['qcow2', 'qed'],
  ['raw', 'qed'],
] as const) {
  test(`commit ${tf} into ${bf}: the same result as qemu-img commit`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const { base, top } = await twins(dir, bf, tf);
    const before = join(dir, 'guest-before.raw');
    await runOk('qemu-img', ['convert', '-O', 'raw', top[0], before]);
    await runImgbdOk(['commit', top[0]]);
    await runOk('qemu-img', ['commit', top[1]]);
    assert.equal((await qemuCompare(base[0], bf, base[1], bf)).code, 0, 'bases differ');
    assert.equal((await qemuCompare(before, 'raw', top[0], tf)).code, 0, 'guest view changed');
    assert.equal((await qemuCompare(top[0], tf, top[1], tf)).code, 0);
    await qemuCheckClean(base[0], bf);
    await qemuCheckClean(top[0], tf);
    // Emptied: nothing allocated in the overlay any more, its backing file unchanged.
    const alloc = (await qemuMapJson(top[0], tf)).filter((e) => e.depth === 0 && e.present);
    assert.deepEqual(alloc, []);
  });
}

test('commit -b into the bottom of a three-image chain, and -d keeps the overlay', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const chains: string[][] = [];
  for (const s of ['a', 'b']) {
    const b = join(dir, `b-${s}.qcow2`);
    const m = join(dir, `m-${s}.qcow2`);
    const tp = join(dir, `t-${s}.qcow2`);
    await runOk('qemu-img', ['create', '-f', 'qcow2', b, SIZE]);
    await io(b, 'qcow2', 'write -P 1 0 4M');
    await runOk('qemu-img', ['create', '-f', 'qcow2', '-b', b, '-F', 'qcow2', m]);
    await io(m, 'qcow2', 'write -P 2 2M 4M');
    await runOk('qemu-img', ['create', '-f', 'qcow2', '-b', m, '-F', 'qcow2', tp]);
    await io(tp, 'qcow2', 'write -P 3 5M 2M', 'write -z 0 64k');
    chains.push([b, m, tp]);
  }
  await runImgbdOk(['commit', '-b', chains[0]![0]!, chains[0]![2]!]);
  await runOk('qemu-img', ['commit', '-b', chains[1]![0]!, chains[1]![2]!]);
  assert.equal((await qemuCompare(chains[0]![0]!, 'qcow2', chains[1]![0]!, 'qcow2')).code, 0);
  // -b implies -d: the top still holds its data.
  assert.ok((await qemuMapJson(chains[0]![2]!, 'qcow2')).some((e) => e.depth === 0 && e.present));
  const r = await runImgbd(['commit', '-b', join(dir, 'nope.qcow2'), chains[0]![2]!]);
  assert.notEqual(r.code, 0);
});

for (const tf of ['qcow2', 'qed'] as const) {
  test(`rebase (safe, -u, and to no backing) on ${tf}: the same as qemu-img rebase`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const { top } = await twins(dir, 'qcow2', tf);
    const other = join(dir, 'other.raw');
    await runOk('qemu-img', ['create', '-f', 'raw', other, String(24 * 1024 * 1024)]);
    await io(other, 'raw', 'write -P 1 0 4M', 'write -P 9 20M 2M');
    const view = join(dir, 'view.raw');
    await runOk('qemu-img', ['convert', '-O', 'raw', top[0], view]);

    await runImgbdOk(['rebase', '-b', other, '-F', 'raw', top[0]]);
    await runOk('qemu-img', ['rebase', '-b', other, '-F', 'raw', top[1]]);
    assert.equal((await qemuCompare(view, 'raw', top[0], tf)).code, 0, 'safe rebase changed the guest view');
    assert.equal((await qemuCompare(top[0], tf, top[1], tf)).code, 0);
    await qemuCheckClean(top[0], tf);
    const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', top[0]])) as Record<string, unknown>;
    assert.equal(info['backing-filename'], other);
    if (tf === 'qcow2') assert.equal(info['backing-filename-format'], 'raw');

    // -u: only the header changes, on both twins the same way.
    const back = join(dir, 'base-a.qcow2');
    await runImgbdOk(['rebase', '-u', '-b', back, '-F', 'qcow2', top[0]]);
    await runOk('qemu-img', ['rebase', '-u', '-b', back, '-F', 'qcow2', top[1]]);
    assert.equal((await qemuCompare(top[0], tf, top[1], tf)).code, 0);
    await qemuCheckClean(top[0], tf);

    // -b "": everything the backing file showed is copied in.
    const view2 = join(dir, 'view2.raw');
    await runOk('qemu-img', ['convert', '-O', 'raw', top[0], view2]);
    await runImgbdOk(['rebase', '-b', '', top[0]]);
    await runOk('qemu-img', ['rebase', '-b', '', top[1]]);
    assert.equal((await qemuCompare(view2, 'raw', top[0], tf)).code, 0);
    assert.equal((await qemuCompare(top[0], tf, top[1], tf)).code, 0);
    const info2 = JSON.parse(await runOk('qemu-img', ['info', '--output=json', top[0]])) as Record<string, unknown>;
    assert.equal(info2['backing-filename'], undefined);
  });
}
