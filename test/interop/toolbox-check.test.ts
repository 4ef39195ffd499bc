// check() on qed and vdi devices, for imgbd check: clean on images qemu-img check calls clean,
// and the problem qemu-img check reports found on a poked image.

import assert from 'node:assert/strict';
import { openSync, writeSync, closeSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openQedPath } from '../../src/formats/qed/format.js';
import { openVdiPath } from '../../src/formats/vdi/format.js';
import { VDI_BLOCKS_ALLOCATED_OFFSET } from '../../src/formats/vdi/header.js';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';
import { runImgbdOk } from './qcow2-cli-helpers.js';
import { writeMixedRaw } from './toolbox-helpers.js';

function poke(path: string, offset: number, bytes: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

test('qed check(): clean after convert; an L1 entry pointing off-cluster is found, as qemu-img check finds it', async (t) => {
  if (!requirePeers(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const raw = join(dir, 'a.raw');
  writeMixedRaw(raw, 6);
  const img = join(dir, 'a.qed');
  await runImgbdOk(['convert', '-O', 'qed', raw, img]);
  await runOk('qemu-img', ['check', '-f', 'qed', img]);
  let dev = await openQedPath(img, { readOnly: true });
  let r = await dev.check();
  await dev.close();
  assert.equal(r.invalidEntries, 0);
  assert.equal(r.duplicateReferences, 0);
  assert.equal(r.leakedClusters, 0);
  // L1 entry 0 (the table sits at l1_table_offset, u64 LE at 40) made unaligned.
  const l1Offset = Number(readFileSync(img).readBigUInt64LE(40));
  const bad = Buffer.alloc(8);
  bad.writeBigUInt64LE(BigInt(l1Offset + 512));
  poke(img, l1Offset, bad);
  const q = await run('qemu-img', ['check', '-f', 'qed', img]);
  assert.notEqual(q.code, 0, 'qemu-img check sees the corruption too');
  dev = await openQedPath(img, { readOnly: true });
  r = await dev.check();
  await dev.close();
  assert.ok(r.invalidEntries >= 1, JSON.stringify(r));
});

test('vdi check(): clean after convert; blocks_allocated above the mapped count is one corruption, as in qemu-img check', async (t) => {
  if (!requirePeers(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const raw = join(dir, 'a.raw');
  writeMixedRaw(raw, 6);
  const img = join(dir, 'a.vdi');
  await runImgbdOk(['convert', '-O', 'vdi', raw, img]);
  await runOk('qemu-img', ['check', '-f', 'vdi', img]);
  let dev = await openVdiPath(img, { readOnly: true });
  const clean = dev.check();
  await dev.close();
  assert.equal(clean.corruptions, 0);
  assert.equal(clean.mappedBlocks, clean.blocksAllocated);
  assert.ok(clean.mappedBlocks > 0 && clean.mappedBlocks < clean.totalBlocks);
  // blocks_allocated one higher than the map uses.
  const at = VDI_BLOCKS_ALLOCATED_OFFSET;
  assert.equal(readFileSync(img).readUInt32LE(at), clean.blocksAllocated);
  const b = Buffer.alloc(4);
  b.writeUInt32LE(clean.blocksAllocated + 1);
  poke(img, at, b);
  const q = await run('qemu-img', ['check', '-f', 'vdi', img]);
  assert.notEqual(q.code, 0, 'qemu-img check sees the mismatch too');
  dev = await openVdiPath(img, { readOnly: true });
  const r = dev.check();
  await dev.close();
  assert.equal(r.corruptions, 1);
  assert.equal(r.blocksAllocated, clean.blocksAllocated + 1);
});
