// The qcow2 image commands (create, info, check, clone, resize, snapshot, serve -l) against
// qemu: every image imgbd makes or changes passes qemu-img check and reads in qemu as intended;
// info and check say what qemu-img says; check exits with qemu-img's codes.

import { strict as assert } from 'node:assert';
import { existsSync, openSync, readFileSync, writeSync, closeSync, ftruncateSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';
import { runImgbd, runImgbdOk, serveImgbd, stopServe } from './qcow2-cli-helpers.js';

const MiB = 1024 * 1024;

async function qemuInfo(image: string): Promise<Record<string, unknown>> {
  return JSON.parse(await runOk('qemu-img', ['info', '--output=json', image])) as Record<string, unknown>;
}

async function assertQemuClean(image: string): Promise<void> {
  const r = await run('qemu-img', ['check', '--output=json', image]);
  assert.equal(r.code, 0, `qemu-img check ${image}: ${r.stdout}${r.stderr}`);
  const j = JSON.parse(r.stdout) as Record<string, number | undefined>;
  assert.equal(j.corruptions ?? 0, 0);
  assert.equal(j.leaks ?? 0, 0);
}

function poke(path: string, offset: number, bytes: number[]): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, Buffer.from(bytes), 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

describe('imgbd create', () => {
  const variants: [string, string][] = [
    ['default', ''],
    ['compat=0.10', 'compat=0.10'],
    ['512-byte clusters', 'cluster_size=512'],
    ['2M clusters, extended L2', 'cluster_size=2M,extended_l2=on'],
    ['zstd, lazy refcounts', 'compression_type=zstd,lazy_refcounts=on'],
    ['refcount_bits=8', 'refcount_bits=8'],
    ['preallocation=metadata', 'preallocation=metadata'],
    ['preallocation=falloc', 'preallocation=falloc'],
    ['preallocation=full', 'preallocation=full'],
  ];
  for (const [name, o] of variants) {
    it(`qcow2 ${name}: qemu-img check clean, same format-specific info as qemu-img create, writable in qemu`, async (t) => {
      if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
      const dir = tempDir(t);
      const ours = join(dir, 'ours.qcow2');
      const theirs = join(dir, 'theirs.qcow2');
      const opt = o === '' ? [] : ['-o', o];
      await runImgbdOk(['create', '-q', '-f', 'qcow2', ...opt, ours, '5M']);
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', ...opt, theirs, '5M']);
      await assertQemuClean(ours);
      const a = await qemuInfo(ours);
      const b = await qemuInfo(theirs);
      assert.equal(a['virtual-size'], b['virtual-size']);
      assert.equal(a['cluster-size'], b['cluster-size']);
      assert.deepEqual(a['format-specific'], b['format-specific']);
      if (o.startsWith('preallocation=')) {
        // Every cluster is mapped, as qemu's own preallocated image.
        const map = JSON.parse(await runOk('qemu-img', ['map', '--output=json', ours])) as { data: boolean }[];
        assert.ok(map.every((e) => e.data), 'preallocated clusters are all mapped');
        if (o !== 'preallocation=metadata') assert.ok(statSync(ours).blocks * 512 >= 5 * MiB, 'falloc/full reserve the data on the host');
      }
      await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 100000 300000', ours]);
      await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 100000 300000', theirs]);
      await runOk('qemu-img', ['compare', ours, theirs]);
      await assertQemuClean(ours);
    });
  }

  it('qcow2 with an external data_file', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = join(dir, 'img.qcow2');
    // qemu opens a relative data file name from its working directory: name it absolutely.
    await runImgbdOk(['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, 'img.data')}`, img, '4M']);
    assert.ok(existsSync(join(dir, 'img.data')), 'the data file is created next to the image');
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 4096 65536', img]);
    await assertQemuClean(img);
    const info = await qemuInfo(img);
    assert.equal((info['format-specific'] as { data: Record<string, unknown> }).data['data-file'], join(dir, 'img.data'));
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x33 4096 65536', img]);
  });

  it('raw with falloc and full preallocation, and size suffixes', async (t) => {
    if (!requirePeers(t, 'qemu-img')) return;
    const dir = tempDir(t);
    for (const p of ['off', 'falloc', 'full']) {
      const img = join(dir, `${p}.img`);
      await runImgbdOk(['create', '-q', '-f', 'raw', '-o', `preallocation=${p}`, img, '3M']);
      assert.equal(statSync(img).size, 3 * MiB);
      if (p !== 'off') assert.ok(statSync(img).blocks * 512 >= 3 * MiB);
    }
  });

  it('-b without a size takes the backing size; -b without -F is refused with the format to add', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const base = join(dir, 'base.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', base, '7M']);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x71 0 1M', base]);
    const refused = await runImgbd(['create', '-f', 'qcow2', '-b', 'base.qcow2', join(dir, 'x.qcow2')]);
    assert.equal(refused.code, 64);
    assert.match(refused.stderr, /-F qcow2/);
    const top = join(dir, 'top.qcow2');
    await runImgbdOk(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
    const info = await qemuInfo(top);
    assert.equal(info['virtual-size'], 7 * MiB);
    assert.equal(info['backing-filename'], 'base.qcow2');
    assert.equal(info['backing-filename-format'], 'qcow2');
    await runOk('qemu-img', ['compare', top, base]);
    await assertQemuClean(top);
  });

  it('refuses bad options with a message that names the fix', async (t) => {
    if (!requirePeers(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const cases: [string[], RegExp][] = [
      [['-o', 'cluster_size=3000'], /power of two/],
      [['-o', 'compat=0.10,extended_l2=on'], /compat 0.10/],
      [['-o', 'bogus=1'], /no creation option 'bogus'/],
      [['-o', 'compat=2'], /0.10.*1.1/],
    ];
    for (const [args, re] of cases) {
      const r = await runImgbd(['create', '-f', 'qcow2', ...args, join(dir, 'x.qcow2'), '1M']);
      assert.equal(r.code, 64, r.stderr);
      assert.match(r.stderr, re);
    }
    const noSize = await runImgbd(['create', '-f', 'qcow2', join(dir, 'x.qcow2')]);
    assert.equal(noSize.code, 64);
    assert.match(noSize.stderr, /SIZE/);
  });
});

describe('imgbd info', () => {
  it('matches qemu-img info --output=json, with --backing-chain, snapshots and a dirty image', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'base.raw'), '3M']);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', '-o', 'cluster_size=4k', join(dir, 'mid.qcow2')]);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', '-o', 'lazy_refcounts=on', join(dir, 'top.qcow2'), '4M']);
    await runOk('qemu-img', ['snapshot', '-c', 'snap one', join(dir, 'mid.qcow2')]);
    await run('sh', ['-c', `qemu-io -f qcow2 -c 'write 0 64k' -c 'sigraise 9' '${join(dir, 'top.qcow2')}' >/dev/null 2>&1`]);
    for (const image of ['top.qcow2', 'mid.qcow2', 'base.raw']) {
      const path = join(dir, image);
      assert.deepEqual(JSON.parse(await runImgbdOk(['info', '--json', path])), await qemuInfo(path), image);
    }
    const top = join(dir, 'top.qcow2');
    const chain = JSON.parse(await runImgbdOk(['info', '--json', '--backing-chain', top])) as unknown[];
    assert.equal(chain.length, 3);
    assert.deepEqual(chain, JSON.parse(await runOk('qemu-img', ['info', '--output=json', '--backing-chain', top])));
    assert.match(await runImgbdOk(['info', top]), /backing file: mid\.qcow2/);
  });
});

describe('imgbd check', () => {
  it('exit codes and JSON match qemu-img check on clean, leaking, corrupt and raw images; -r leaks repairs', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const clean = join(dir, 'clean.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', clean, '1M']);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write 0 200k', clean]);
    // A leak: refcount 1 for cluster 10, inside the file, referenced by nothing.
    const leaky = join(dir, 'leaky.qcow2');
    await runOk('cp', [clean, leaky]);
    const fd = openSync(leaky, 'r+');
    ftruncateSync(fd, 16 * 65536);
    closeSync(fd);
    poke(leaky, 0x20000 + 2 * 12, [0, 1]);
    // A corruption: the L1 table's cluster (3) with refcount 0.
    const corrupt = join(dir, 'corrupt.qcow2');
    await runOk('cp', [leaky, corrupt]);
    poke(corrupt, 0x20000 + 2 * 3, [0, 0]);
    const raw = join(dir, 'disk.raw');
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', raw, '1M']);
    // Lazy refcounts left dirty by a killed writer: refcounts and COPIED flags both stale.
    const dirty = join(dir, 'dirty.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', dirty, '8M']);
    await run('sh', ['-c', `qemu-io -f qcow2 -c 'write -P 0x42 0 200k' -c 'sigraise 9' '${dirty}' >/dev/null 2>&1`]);

    for (const [image, code] of [[clean, 0], [leaky, 3], [corrupt, 2], [dirty, 2]] as const) {
      const theirs = await run('qemu-img', ['check', '--output=json', image]);
      const ours = await runImgbd(['check', '--json', image]);
      assert.equal(theirs.code, code, `qemu-img check ${image}`);
      assert.equal(ours.code, code, `imgbd check ${image}: ${ours.stderr}`);
      assert.deepEqual(JSON.parse(ours.stdout), JSON.parse(theirs.stdout));
    }
    assert.equal((await run('qemu-img', ['check', raw])).code, 63);
    assert.equal((await runImgbd(['check', raw])).code, 63);
    const text = await runImgbd(['check', leaky]);
    assert.match(text.stdout, /1 leaked clusters were found/);
    assert.match(text.stdout, /-r leaks/);

    // Repair of a dirty lazy-refcounts image rebuilds its refcounts (qemu-img needs -r all).
    const dirtyRepair = await runImgbd(['check', '-r', 'leaks', dirty]);
    assert.equal(dirtyRepair.code, 0, dirtyRepair.stdout + dirtyRepair.stderr);
    assert.match(dirtyRepair.stderr, /left dirty/);
    await assertQemuClean(dirty);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x42 0 200k', dirty]);

    const repaired = await runImgbd(['check', '-r', 'leaks', leaky]);
    assert.equal(repaired.code, 0, repaired.stdout + repaired.stderr);
    assert.match(repaired.stdout, /1 leaked clusters/);
    await assertQemuClean(leaky);
    await runOk('qemu-img', ['compare', clean, leaky]);
  });
});

describe('imgbd clone', () => {
  it('records the base format, names the base relatively in one directory, absolutely across', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const base = join(dir, 'golden.img');
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', base, '6M']);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x47 0 6M', base]);
    const near = join(dir, 'vm1.qcow2');
    await runImgbdOk(['clone', '-q', base, near]);
    const info = await qemuInfo(near);
    assert.equal(info['backing-filename'], 'golden.img');
    assert.equal(info['backing-filename-format'], 'raw');
    assert.equal(info['virtual-size'], 6 * MiB);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x48 1M 4096', near]);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x47 0 1M', '-c', 'read -P 0x48 1M 4096', near]);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'read -P 0x47 1M 4096', base]);
    await assertQemuClean(near);

    const far = join(dir, 'sub', 'vm2.qcow2');
    await runOk('mkdir', [join(dir, 'sub')]);
    await runImgbdOk(['clone', '-q', '-o', 'cluster_size=4k', near, far]);
    const farInfo = await qemuInfo(far);
    assert.equal(farInfo['backing-filename'], near);
    assert.equal(farInfo['backing-filename-format'], 'qcow2');
    assert.equal(farInfo['cluster-size'], 4096);
    await runOk('qemu-img', ['compare', far, near]);
    await assertQemuClean(far);
    const again = await runImgbd(['clone', base, near]);
    assert.equal(again.code, 64);
    assert.match(again.stderr, /already exists/);
  });
});

describe('imgbd resize', () => {
  it('grows qcow2 and raw; shrinks only with --shrink and only over unused space', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = join(dir, 'img.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '4M']);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x52 0 1M', img]);
    // 4K clusters: 512 L2 entries per table, so 4M -> 40M needs a larger L1 table.
    await runImgbdOk(['resize', '-q', img, '+36M']);
    assert.equal((await qemuInfo(img))['virtual-size'], 40 * MiB);
    await assertQemuClean(img);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x52 0 1M', '-c', 'read -P 0 1M 39M', '-c', 'write -P 0x53 39M 1M', img]);
    await assertQemuClean(img);

    const noFlag = await runImgbd(['resize', img, '20M']);
    assert.equal(noFlag.code, 64);
    assert.match(noFlag.stderr, /--shrink/);
    const used = await runImgbd(['resize', '--shrink', img, '20M']);
    assert.notEqual(used.code, 0);
    assert.match(used.stderr, /holds data at byte 40894464/);
    assert.equal((await qemuInfo(img))['virtual-size'], 40 * MiB);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'discard 39M 1M', img]);
    await runImgbdOk(['resize', '-q', '--shrink', img, '--', '-20M']);
    assert.equal((await qemuInfo(img))['virtual-size'], 20 * MiB);
    await assertQemuClean(img);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x52 0 1M', '-c', 'write -P 0x54 19M 1M', img]);
    await assertQemuClean(img);

    const raw = join(dir, 'disk.raw');
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', raw, '2M']);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 1M 4096', raw]);
    await runImgbdOk(['resize', '-q', raw, '3M']);
    assert.equal(statSync(raw).size, 3 * MiB);
    const rawUsed = await runImgbd(['resize', '--shrink', raw, '1M']);
    assert.match(rawUsed.stderr, /holds data at byte 1048576/);
    await runImgbdOk(['resize', '-q', '--shrink', raw, String(MiB + 4096)]);
    assert.equal(statSync(raw).size, MiB + 4096);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'read -P 0x55 1M 4096', raw]);
  });
});

describe('imgbd snapshot and serve -l', () => {
  it('create, list, apply, delete agree with qemu-img snapshot; serve -l exports the snapshot read-only', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = join(dir, 'img.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x01 0 2M', img]);
    await runImgbdOk(['snapshot', '-c', 'before', img]);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x02 1M 2M', img]);
    await runImgbdOk(['snapshot', '-c', 'after', img]);
    await assertQemuClean(img);
    const list = await runOk('qemu-img', ['snapshot', '-l', img]);
    assert.match(list, /before/);
    assert.match(list, /after/);
    const ours = JSON.parse(await runImgbdOk(['snapshot', '-l', '--json', img])) as { name: string }[];
    assert.deepEqual(ours, (await qemuInfo(img)).snapshots);

    // The export of snapshot "before" is what qemu extracts from it.
    const extracted = join(dir, 'before.raw');
    await runOk('qemu-img', ['convert', '-l', 'snapshot.name=before', '-O', 'raw', img, extracted]);
    const served = await serveImgbd(t, join(dir, 'nbd.sock'), ['-f', 'qcow2', '-l', 'before', '-t', '-e', '0', img]);
    try {
      await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', extracted, served.uri]);
      const write = await run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', served.uri]);
      assert.notEqual(write.code, 0, 'a snapshot export is read-only');
      assert.match(write.stderr, /Permission denied|read-only/i);
    } finally {
      await stopServe(served);
    }
    const missing = await runImgbd(['serve', '-k', join(dir, 'x.sock'), '-l', 'nope', img]);
    assert.notEqual(missing.code, 0);
    assert.match(missing.stderr, /no snapshot "nope"/);

    await runImgbdOk(['snapshot', '-a', 'before', img]);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x01 0 2M', '-c', 'read -P 0 2M 6M', img]);
    await assertQemuClean(img);
    await runImgbdOk(['snapshot', '-d', 'after', img]);
    await runImgbdOk(['snapshot', '-d', 'before', img]);
    assert.equal((await qemuInfo(img)).snapshots, undefined);
    await assertQemuClean(img);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x01 0 2M', img]);
    const dup = await runImgbd(['snapshot', '-c', 'x', '-d', 'y', img]);
    assert.equal(dup.code, 64);
  });
});

describe('option and size parsing', () => {
  it('-o strings split like qemu (a doubled comma is a comma); sizes are absolute or relative', async () => {
    const { parseOptionString, qcow2CreateOptions } = await import('../../src/cli/commands/create.js');
    const { targetSize } = await import('../../src/cli/commands/resize.js');
    const o = parseOptionString(['cluster_size=4k,compat=v2', 'data_file=a,,b.raw']);
    assert.deepEqual([...o.entries()], [['cluster_size', '4k'], ['compat', 'v2'], ['data_file', 'a,b.raw']]);
    const q = qcow2CreateOptions(o);
    assert.equal(q.clusterSize, 4096);
    assert.equal(q.compat, '0.10');
    assert.equal(q.dataFile, 'a,b.raw');
    assert.throws(() => parseOptionString(['cluster_size']), /key=value/);
    assert.throws(() => qcow2CreateOptions(new Map([['extended_l2', 'maybe']])), /on or off/);
    assert.equal(targetSize('+1M', 4096), 4096 + MiB);
    assert.equal(targetSize('-4k', 8192), 4096);
    assert.equal(targetSize('2G', 1), 2 * 1024 * MiB);
    assert.throws(() => targetSize('-1M', 4096), /smaller than nothing/);
  });
});

describe('imgbd check on qed and vdi', () => {
  it('exit status and corruption count as qemu-img check, clean and poked', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const { VDI_BLOCKS_ALLOCATED_OFFSET } = await import('../../src/formats/vdi/header.js');
    const dir = tempDir(t);
    const qed = join(dir, 'a.qed');
    const vdi = join(dir, 'a.vdi');
    await runOk('qemu-img', ['create', '-q', '-f', 'qed', qed, '4M']);
    await runOk('qemu-img', ['create', '-q', '-f', 'vdi', vdi, '4M']);
    for (const [img, f] of [[qed, 'qed'], [vdi, 'vdi']] as const) await runOk('qemu-io', ['-f', f, '-c', 'write -P 0x21 0 300k', img]);
    const pokedVdi = join(dir, 'b.vdi');
    await runOk('cp', [vdi, pokedVdi]);
    const b = Buffer.alloc(4);
    b.writeUInt32LE(readFileSync(vdi).readUInt32LE(VDI_BLOCKS_ALLOCATED_OFFSET) + 1);
    poke(pokedVdi, VDI_BLOCKS_ALLOCATED_OFFSET, [...b]);
    const pokedQed = join(dir, 'b.qed');
    await runOk('cp', [qed, pokedQed]);
    // L1 entry 0 (table at l1_table_offset, u64 LE at 40) moved off its cluster boundary.
    const l1Offset = Number(readFileSync(qed).readBigUInt64LE(40));
    const e = Buffer.alloc(8);
    e.writeBigUInt64LE(readFileSync(qed).readBigUInt64LE(l1Offset) + 512n);
    poke(pokedQed, l1Offset, [...e]);
    for (const img of [qed, vdi, pokedVdi, pokedQed]) {
      const theirs = await run('qemu-img', ['check', '--output=json', img]);
      const ours = await runImgbd(['check', '--json', img]);
      assert.equal(ours.code, theirs.code, `${img}: ${ours.stdout}${ours.stderr} vs ${theirs.stdout}${theirs.stderr}`);
      const a = JSON.parse(ours.stdout) as Record<string, unknown>;
      const q = JSON.parse(theirs.stdout) as Record<string, unknown>;
      assert.equal(a.corruptions, q.corruptions, img);
      assert.equal(a.leaks, q.leaks, img);
      assert.equal(a.format, q.format, img);
    }
  });
});
