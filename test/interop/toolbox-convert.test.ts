// imgbd convert against QEMU: every pair of raw, qcow2, qed and vdi (and qcow2 -c with zlib and
// zstd) compares equal to the source with qemu-img compare and passes qemu-img check; zero
// ranges stay unallocated; NBD URIs on either side through qemu-nbd; -B writes only what
// differs from the backing file.

import assert from 'node:assert/strict';
import { statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { requirePeers, runOk, spawnPeer, tempDir, waitFor } from '../helpers/peers.js';
import { existsSync } from 'node:fs';
import { runImgbd, runImgbdOk } from './qcow2-cli-helpers.js';
import { MiB, qemuCheckClean, qemuCompare, qemuMapJson, writeMixedRaw } from './toolbox-helpers.js';

const FORMATS = ['raw', 'qcow2', 'qed', 'vdi'] as const;
const SIZE_MIB = 20;

async function sources(dir: string): Promise<Record<string, string>> {
  const raw = join(dir, 'src.raw');
  writeMixedRaw(raw, SIZE_MIB);
  const out: Record<string, string> = { raw };
  for (const f of FORMATS) {
    if (f === 'raw') continue;
    out[f] = join(dir, `src.${f}`);
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', f, raw, out[f]]);
  }
  return out;
}

test('convert: every format pair compares equal and checks clean', async (t) => {
  if (!requirePeers(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const src = await sources(dir);
  for (const from of FORMATS) {
    for (const to of FORMATS) {
      const dst = join(dir, `${from}-to-${to}.${to}`);
      await runImgbdOk(['convert', '-f', from, '-O', to, src[from]!, dst]);
      const c = await qemuCompare(src[from]!, from, dst, to);
      assert.equal(c.code, 0, `${from} -> ${to}: ${c.stdout}`);
      await qemuCheckClean(dst, to);
    }
  }
  // Sparse: the raw output holds about the data, not the virtual size (holes and zeros skipped).
  const rawOut = statSync(join(dir, 'qcow2-to-raw.raw'));
  assert.ok(rawOut.blocks * 512 < 0.75 * rawOut.size, `raw output allocates ${rawOut.blocks * 512} of ${rawOut.size} bytes`);
  // qcow2 output: the written-zero MiBs and the holes are not allocated.
  const map = await qemuMapJson(join(dir, 'raw-to-qcow2.qcow2'), 'qcow2');
  for (const m of [2, 3, 7, 8]) {
    const hit = map.find((e) => e.start <= m * MiB && e.start + e.length > m * MiB)!;
    assert.equal(hit.data, false, `MiB ${m} should not be allocated: ${JSON.stringify(hit)}`);
  }
});

test('convert -c: compressed qcow2 with zlib and zstd compares equal, checks clean, is smaller', async (t) => {
  if (!requirePeers(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const src = await sources(dir);
  for (const from of FORMATS) {
    for (const type of ['zlib', 'zstd']) {
      const dst = join(dir, `${from}-c-${type}.qcow2`);
      await runImgbdOk(['convert', '-c', '-f', from, '-O', 'qcow2', '-o', `compression_type=${type}`, src[from]!, dst]);
      const c = await qemuCompare(src[from]!, from, dst, 'qcow2');
      assert.equal(c.code, 0, `${from} -c ${type}: ${c.stdout}`);
      const check = JSON.parse(await runOk('qemu-img', ['check', '--output=json', dst])) as { 'compressed-clusters'?: number; corruptions?: number; leaks?: number };
      assert.ok((check['compressed-clusters'] ?? 0) > 0, `no compressed clusters in ${dst}`);
      assert.equal(check.corruptions ?? 0, 0);
      assert.equal(check.leaks ?? 0, 0);
      const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', dst])) as { 'format-specific': { data: { 'compression-type': string } } };
      assert.equal(info['format-specific'].data['compression-type'], type);
      const plain = statSync(join(dir, 'src.qcow2')).size;
      assert.ok(statSync(dst).size < plain, `compressed ${statSync(dst).size} >= plain ${plain}`);
    }
  }
});

test('convert to and from NBD URIs served by qemu-nbd', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-nbd')) return;
  const dir = tempDir(t);
  const src = await sources(dir);
  // To an export: the target exists, is written in place, with zeros where the source has them.
  const target = join(dir, 'target.raw');
  await runOk('qemu-img', ['create', '-f', 'raw', target, String(SIZE_MIB * MiB + 12_288)]);
  await runOk('qemu-io', ['-f', 'raw', '-c', `write -P 0x55 0 ${SIZE_MIB * MiB}`, target]);
  const wsock = join(dir, 'w.sock');
  const w = spawnPeer(t, 'qemu-nbd', ['-k', wsock, '-f', 'raw', '-t', target]);
  await waitFor(() => existsSync(wsock), 10_000, 'qemu-nbd socket');
  await runImgbdOk(['convert', '-f', 'qcow2', src.qcow2!, `nbd+unix:///?socket=${wsock}`]);
  w.kill('SIGTERM');
  await new Promise((r) => w.once('exit', r));
  assert.equal((await qemuCompare(src.raw!, 'raw', target, 'raw')).code, 0);

  // From an export (read-only qcow2 behind qemu-nbd) into a new qcow2.
  const rsock = join(dir, 'r.sock');
  spawnPeer(t, 'qemu-nbd', ['-k', rsock, '-r', '-f', 'qcow2', src.qcow2!]);
  await waitFor(() => existsSync(rsock), 10_000, 'qemu-nbd socket');
  const out = join(dir, 'from-nbd.qcow2');
  await runImgbdOk(['convert', '-O', 'qcow2', `nbd+unix:///?socket=${rsock}`, out]);
  assert.equal((await qemuCompare(src.raw!, 'raw', out, 'qcow2')).code, 0);
  await qemuCheckClean(out, 'qcow2');
});

test('convert -B: only what differs from the backing file is written', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const src = await sources(dir);
  const base = src.qcow2!;
  const vm = join(dir, 'vm.raw');
  await runOk('qemu-img', ['convert', '-O', 'raw', base, vm]);
  await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 5M 128k', '-c', 'write -z 0 64k', vm]);
  const delta = join(dir, 'delta.qcow2');
  await runImgbdOk(['convert', '-f', 'raw', '-O', 'qcow2', '-B', base, '-F', 'qcow2', vm, delta]);
  assert.equal((await qemuCompare(vm, 'raw', delta, 'qcow2')).code, 0);
  await qemuCheckClean(delta, 'qcow2');
  const top = (await qemuMapJson(delta, 'qcow2')).filter((e) => e.depth === 0 && e.present);
  const topBytes = top.reduce((n, e) => n + e.length, 0);
  assert.equal(topBytes, 128 * 1024 + 64 * 1024, `top layer holds ${JSON.stringify(top)}`);
  const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', delta])) as { 'backing-filename': string; 'backing-filename-format': string };
  assert.equal(info['backing-filename'], base);
  assert.equal(info['backing-filename-format'], 'qcow2');
});

test('convert refuses -c for a non-qcow2 target and an NBD source with -f qcow2', async (t) => {
  const dir = tempDir(t);
  const raw = join(dir, 'a.raw');
  writeMixedRaw(raw, 2);
  const r = await runImgbd(['convert', '-c', '-O', 'raw', raw, join(dir, 'b.raw')]);
  assert.equal(r.code, 64, r.stderr);
  assert.match(r.stderr, /-c needs a qcow2 target/);
  const r2 = await runImgbd(['convert', '-f', 'qcow2', 'nbd+unix:///?socket=/nonexistent', join(dir, 'c.raw')]);
  assert.equal(r2.code, 64, r2.stderr);
});

test('convert to qcow2 keeps the asked-for lazy_refcounts setting and leaves the image clean', async (t) => {
  if (!requirePeers(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const raw = join(dir, 'a.raw');
  writeMixedRaw(raw, 4);
  for (const lazy of ['off', 'on']) {
    const out = join(dir, `lazy-${lazy}.qcow2`);
    await runImgbdOk(['convert', '-O', 'qcow2', '-o', `lazy_refcounts=${lazy}`, raw, out]);
    const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', out])) as { 'dirty-flag': boolean; 'format-specific': { data: { 'lazy-refcounts': boolean; corrupt: boolean } } };
    assert.equal(info['format-specific'].data['lazy-refcounts'], lazy === 'on');
    assert.equal(info['dirty-flag'], false);
    await qemuCheckClean(out, 'qcow2');
    assert.equal((await qemuCompare(raw, 'raw', out, 'qcow2')).code, 0);
  }
});

test('convert refuses to write over its own source', async (t) => {
  const dir = tempDir(t);
  const raw = join(dir, 'a.raw');
  writeMixedRaw(raw, 2);
  const before = statSync(raw).size;
  const r = await runImgbd(['convert', '-O', 'qcow2', raw, join(dir, '.', 'a.raw')]);
  assert.equal(r.code, 64, r.stderr);
  assert.match(r.stderr, /the source itself/);
  assert.equal(statSync(raw).size, before);
});

test('convert -c: an image whose last cluster is short is compressed whole and reads back equal', async (t) => {
  if (!requirePeers(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const raw = join(dir, 'odd.raw');
  // 3 clusters and 12 KiB of text-like data: every cluster compresses, the last one padded.
  writeFileSync(raw, Buffer.from('compressible '.repeat(Math.ceil((3 * 65536 + 12_288) / 13))).subarray(0, 3 * 65536 + 12_288));
  for (const type of ['zlib', 'zstd']) {
    const dst = join(dir, `odd-${type}.qcow2`);
    await runImgbdOk(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, raw, dst]);
    assert.equal((await qemuCompare(raw, 'raw', dst, 'qcow2')).code, 0, type);
    const check = JSON.parse(await runOk('qemu-img', ['check', '--output=json', dst])) as { 'compressed-clusters'?: number };
    assert.equal(check['compressed-clusters'], 4, type);
  }
});

test('-p draws a progress bar on stderr (convert, compare); without it, in a pipe, none', async (t) => {
  const dir = tempDir(t);
  const raw = join(dir, 'p.raw');
  writeFileSync(raw, Buffer.alloc(3 * MiB, 7));
  const withBar = await runImgbd(['convert', '-p', '-f', 'raw', '-O', 'raw', raw, join(dir, 'p2.raw')]);
  assert.equal(withBar.code, 0, withBar.stderr);
  assert.match(withBar.stderr, /converting \[.*\] 100% \| 3\/3 MiB/);
  const compared = await runImgbd(['compare', '-p', '-f', 'raw', '-F', 'raw', raw, join(dir, 'p2.raw')]);
  assert.equal(compared.code, 0, compared.stderr);
  assert.match(compared.stderr, /comparing \[.*\] 100%/);
  const quiet = await runImgbd(['convert', '-f', 'raw', '-O', 'raw', raw, join(dir, 'p3.raw')]);
  assert.equal(quiet.code, 0, quiet.stderr);
  assert.equal(quiet.stderr, '');
});

test('convert -t unsafe (no flush at all) and -t writeback leave complete, clean images with their features as asked', async (t) => {
  if (!requirePeers(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const src = await sources(dir);
  for (const [to, cache] of [['qcow2', 'unsafe'], ['raw', 'unsafe'], ['qcow2', 'writeback'], ['raw', 'writeback']] as const) {
    const dst = join(dir, `${cache}.${to}`);
    await runImgbdOk(['convert', '-t', cache, '-f', 'raw', '-O', to, src.raw!, dst]);
    assert.equal((await qemuCompare(src.raw!, 'raw', dst, to)).code, 0, `${to} -t ${cache}`);
    if (to === 'qcow2') {
      await qemuCheckClean(dst, 'qcow2');
      const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', dst])) as { 'format-specific': { data: { 'lazy-refcounts': boolean } } };
      assert.equal(info['format-specific'].data['lazy-refcounts'], false);
    }
  }
});
