// Internal snapshots created, applied and deleted through the driver, checked with qemu-img:
// `snapshot -l` lists what we wrote, `convert -l` reads each snapshot as it was, `check` finds
// no errors and no leaks, and qemu-img's own snapshots interoperate with ours.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';
import { openQcow2Chain, qemuCheck, qemuContent, readAll } from '../fixtures/qcow2/helpers.js';

const MiB = 1024 * 1024;

async function snapshotContent(dir: string, img: string, name: string): Promise<Buffer> {
  const out = join(dir, `snap-${name}-${Math.random().toString(36).slice(2)}.raw`);
  await runOk('qemu-img', ['convert', '-O', 'raw', '-l', `snapshot.name=${name}`, img, out]);
  return readFileSync(out);
}

async function assertClean(img: string): Promise<void> {
  const chk = await qemuCheck(img);
  assert.equal(chk.code, 0, JSON.stringify(chk.json));
}

interface QemuSnap {
  id: string;
  name: string;
  'vm-state-size': number;
}

async function qemuSnapshots(img: string): Promise<QemuSnap[]> {
  const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', img])) as { snapshots?: QemuSnap[] };
  return info.snapshots ?? [];
}

for (const layout of ['plain 64K clusters', 'compressed 4K clusters']) {
  test(`qcow2 snapshots (${layout}): create, apply and delete agree with qemu-img`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    let img = join(dir, 's.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', layout.startsWith('plain') ? 'cluster_size=65536' : 'cluster_size=4096', img, String(8 * MiB)]);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x41 0 3M', '-c', 'write -P 0x42 5M 100k', img]);
    if (layout.startsWith('compressed')) {
      const c = join(dir, 'c.qcow2');
      await runOk('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096', img, c]);
      img = c;
    }
    const stateA = await qemuContent(dir, img);

    let dev = await openQcow2Chain(img);
    const s1 = await dev.createSnapshot('s1');
    assert.equal(s1.id, '1');
    await dev.pwrite(Buffer.alloc(70000, 0x43), 1000);
    await dev.zero(2 * MiB, 512 * 1024, { mayTrim: true });
    await dev.trim(5 * MiB, 64 * 1024);
    await dev.close();
    await assertClean(img);
    assert.deepEqual((await qemuSnapshots(img)).map((s) => [s.id, s.name, s['vm-state-size']]), [['1', 's1', 0]]);
    assert.ok((await snapshotContent(dir, img, 's1')).equals(stateA), 'snapshot s1 holds the state it was taken in');
    const stateB = await qemuContent(dir, img);
    assert.ok(!stateB.equals(stateA));

    // A snapshot taken by qemu-img next to ours, then more writes by qemu-io.
    await runOk('qemu-img', ['snapshot', '-c', 's2', img]);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x44 4M 1M', img]);
    dev = await openQcow2Chain(img);
    assert.deepEqual(dev.snapshots.map((s) => s.name), ['s1', 's2']);
    await dev.applySnapshot('s1');
    assert.ok((await readAll(dev)).equals(stateA), 'applied s1 reads as state A');
    await dev.pwrite(Buffer.alloc(4096, 0x45), 7 * MiB);
    await dev.deleteSnapshot('2');
    await dev.close();
    await assertClean(img);
    assert.deepEqual((await qemuSnapshots(img)).map((s) => s.name), ['s1']);
    const expected = Buffer.from(stateA);
    expected.fill(0x45, 7 * MiB, 7 * MiB + 4096);
    assert.ok((await qemuContent(dir, img)).equals(expected));
    assert.ok((await snapshotContent(dir, img, 's1')).equals(stateA));

    // qemu-img applies and deletes the snapshot we created.
    await runOk('qemu-img', ['snapshot', '-a', 's1', img]);
    assert.ok((await qemuContent(dir, img)).equals(stateA));
    dev = await openQcow2Chain(img);
    await dev.createSnapshot('s3');
    await assert.rejects(dev.createSnapshot('s3'), /already exists/);
    await dev.deleteSnapshot('s1');
    await dev.close();
    await runOk('qemu-img', ['snapshot', '-d', 's3', img]);
    assert.deepEqual(await qemuSnapshots(img), []);
    await assertClean(img);
    const r = await run('qemu-img', ['check', img]);
    assert.match(r.stdout, /No errors were found/);
  });
}
