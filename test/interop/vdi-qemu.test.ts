// The VDI driver against QEMU: static and dynamic images qemu-img and qemu-io made read byte for
// byte as `qemu-img convert -O raw` sees them (extents as `qemu-img map` reports them); seeded
// random workloads through the driver replayed by qemu-io on a twin compare equal and check
// clean; created images match qemu-img's (check, info, compare); vdi works as a backing file
// under qcow2 and qed overlays through the registry.

import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { EXTENT_ZERO, type BlockDevice } from '../../src/block/device.js';
import { openImageWithFormat } from '../../src/formats/open.js';
import { createQed } from '../../src/formats/qed/create.js';
import { openQedPath } from '../../src/formats/qed/format.js';
import { createVdi } from '../../src/formats/vdi/create.js';
import { openVdiPath } from '../../src/formats/vdi/format.js';
import { parseVdiHeader } from '../../src/formats/vdi/header.js';
import { prng, qemuCheck, qemuContent, qemuMap, readAll } from '../fixtures/qcow2/helpers.js';
import { runWriterAndKill, repoModule } from '../helpers/killed-writer.js';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';

const MiB = 1024 * 1024;

function randomBuffer(rand: () => number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i + 4 <= n; i += 4) b.writeUInt32LE((rand() * 0x1_0000_0000) >>> 0, i);
  for (let i = n - (n % 4); i < n; i++) b[i] = (rand() * 256) | 0;
  return b;
}

async function qemuIo(format: string, path: string, commands: string[]): Promise<void> {
  const r = await run('qemu-io', ['-f', format, path], { input: commands.join('\n') + '\nquit\n' });
  assert.equal(r.code, 0, r.stderr);
  assert.doesNotMatch(r.stdout + r.stderr, /error|failed/i, 'qemu-io reported a failure');
}

/** Our zero flag agrees with `qemu-img map` over every range it reports. */
async function assertZeroMatchesQemu(dev: BlockDevice, path: string): Promise<void> {
  for (const e of await qemuMap(path)) {
    for (const x of await dev.extents!(e.start, e.length)) {
      assert.equal((x.flags & EXTENT_ZERO) !== 0, e.zero, `zero flag in [${e.start}, +${e.length}): qemu ${JSON.stringify(e)}`);
    }
  }
}

async function assertReadsLikeQemu(t: TestContext, dir: string, path: string, checkMap = true): Promise<void> {
  const ref = await qemuContent(dir, path);
  const dev = (await openImageWithFormat(path, { readOnly: true })).device;
  t.after(() => dev.close());
  assert.equal(dev.sizeBytes, ref.length);
  assert.ok((await readAll(dev, 3 * MiB + 4097)).equals(ref), `${path} reads differently from qemu-img convert`);
  if (checkMap) await assertZeroMatchesQemu(dev, path);
}

for (const isStatic of [false, true]) {
  test(`vdi read: a ${isStatic ? 'static' : 'dynamic'} qemu-img image after qemu-io writes`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = join(dir, 'q.vdi');
    // 10,000,000 is not a multiple of 512: qemu-img rounds it up to whole sectors.
    await runOk('qemu-img', ['create', '-q', '-f', 'vdi', ...(isStatic ? ['-o', 'static=on'] : []), img, '10000000']);
    await qemuIo('vdi', img, ['write -q -P 0x11 1000 2M', 'write -q -P 0x22 7M 100', 'write -q -z 1500000 4096', 'write -q -P 0x33 9998000 2000']);
    await assertReadsLikeQemu(t, dir, img, !isStatic);
    const dev = await openVdiPath(img, { readOnly: true });
    t.after(() => dev.close());
    assert.equal(dev.isStatic, isStatic);
    assert.equal(dev.sizeBytes, 10_000_384);
  });
}

interface Op {
  readonly kind: 'write' | 'zero' | 'trim';
  readonly off: number;
  readonly len: number;
  readonly src: number;
}

async function twinWorkload(t: TestContext, seed: number, isStatic: boolean): Promise<void> {
  const dir = tempDir(t);
  const rand = prng(seed);
  const size = 24 * MiB;
  const sources = [0, 1, 2, 3].map((i) => {
    const b = randomBuffer(rand, 4 * MiB);
    writeFileSync(join(dir, `src${i}.bin`), b);
    return b;
  });
  const model = Buffer.alloc(size);
  const a = join(dir, 'a.vdi');
  const b = join(dir, 'b.vdi');
  await runOk('qemu-img', ['create', '-q', '-f', 'vdi', ...(isStatic ? ['-o', 'static=on'] : []), a, String(size)]);
  copyFileSync(a, b);
  const ops: Op[] = [];
  for (let i = 0; i < 300; i++) {
    let off = Math.floor(rand() * size);
    let len = 1 + Math.floor(rand() * (rand() < 0.2 ? 4 * MiB : 256 * 1024));
    if (rand() < 0.4) {
      off -= off % 4096;
      len = Math.max(4096, len - (len % 4096));
    }
    len = Math.min(len, size - off);
    const r = rand();
    ops.push({ kind: r < 0.65 ? 'write' : r < 0.85 ? 'zero' : 'trim', off, len, src: Math.floor(rand() * 4) });
  }
  const script: string[] = [];
  const dev = await openVdiPath(a);
  for (const op of ops) {
    if (op.kind === 'write') {
      await dev.pwrite(sources[op.src]!.subarray(0, op.len), op.off);
      sources[op.src]!.copy(model, op.off, 0, op.len);
      script.push(`write -q -s ${join(dir, `src${op.src}.bin`)} ${op.off} ${op.len}`);
    } else {
      // Zero and trim both leave exactly the range reading as zeros (the map never changes).
      if (op.kind === 'zero') await dev.zero(op.off, op.len, { mayTrim: op.src % 2 === 0 });
      else await dev.trim(op.off, op.len);
      model.fill(0, op.off, op.off + op.len);
      script.push(`write -q -z ${op.off} ${op.len}`);
    }
  }
  await dev.close();
  await qemuIo('vdi', b, script);
  const ours = await qemuContent(dir, a);
  assert.ok(ours.equals(model), "the driver's image differs from the model");
  const cmp = await run('qemu-img', ['compare', '-f', 'vdi', '-F', 'vdi', a, b]);
  assert.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
  const chk = await qemuCheck(a);
  assert.equal(chk.code, 0, JSON.stringify(chk.json));
  // Blocks are allocated in first-write order on both sides, so even the layout matches.
  const ha = parseVdiHeader(readFileSync(a).subarray(0, 512), readFileSync(a).length);
  const hb = parseVdiHeader(readFileSync(b).subarray(0, 512), readFileSync(b).length);
  assert.equal(ha.blocksAllocated, hb.blocksAllocated);
  await assertReadsLikeQemu(t, dir, a, false);
}

test('vdi write: 300 seeded writes/zeroes/trims on a dynamic image, replayed by qemu-io on a twin', (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  return twinWorkload(t, 404, false);
});

test('vdi write: 300 seeded writes/zeroes/trims on a static image, replayed by qemu-io on a twin', (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  return twinWorkload(t, 505, true);
});

test('vdi create: images match qemu-img create (check, info, compare, layout)', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  for (const [size, isStatic] of [[0, false], [5_000_000, false], [64 * MiB, false], [5_000_000, true], [3 * MiB, true]] as const) {
    const ours = join(dir, `ours-${size}-${isStatic}.vdi`);
    const theirs = join(dir, `theirs-${size}-${isStatic}.vdi`);
    await createVdi(ours, { sizeBytes: size, static: isStatic });
    await runOk('qemu-img', ['create', '-q', '-f', 'vdi', ...(isStatic ? ['-o', 'static=on'] : []), theirs, String(size)]);
    const chk = await qemuCheck(ours);
    assert.equal(chk.code, 0, JSON.stringify(chk.json));
    const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', ours])) as Record<string, unknown>;
    assert.equal(info.format, 'vdi');
    assert.equal(info['virtual-size'], Math.ceil(size / 512) * 512);
    const cmp = await run('qemu-img', ['compare', '-f', 'vdi', '-F', 'vdi', ours, theirs]);
    assert.equal(cmp.code, 0, cmp.stdout);
    // Byte-identical apart from the two random UUIDs.
    const x = readFileSync(ours);
    const y = readFileSync(theirs);
    assert.equal(x.length, y.length);
    x.fill(0, 0x188, 0x1a8);
    y.fill(0, 0x188, 0x1a8);
    assert.ok(x.equals(y), `${ours} differs from qemu-img's layout`);
    if (size > 0) {
      await qemuIo('vdi', ours, [`write -q -P 0x5a ${size - 700} 700`]);
      await assertReadsLikeQemu(t, dir, ours, !isStatic);
    }
  }
});

test('vdi as a backing file: qcow2 and qed overlays over vdi read like qemu through the registry', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const base = join(dir, 'base.vdi');
  await createVdi(base, { sizeBytes: 8 * MiB });
  const dev = await openVdiPath(base);
  await dev.pwrite(randomBuffer(prng(3), 3 * MiB), MiB + 100);
  await dev.close();
  const top = join(dir, 'top.qcow2');
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.vdi', '-F', 'vdi', top, String(8 * MiB)]);
  await qemuIo('qcow2', top, ['write -q -P 0x34 2M 64k']);
  await assertReadsLikeQemu(t, dir, top, false);
  const over = join(dir, 'over.qed');
  await createQed(over, { sizeBytes: 8 * MiB, backingFile: 'base.vdi', backingFormat: 'vdi' });
  const q = await openQedPath(over);
  await q.pwrite(Buffer.alloc(3000, 0x56), 2 * MiB - 1000);
  // vdi blocks 1-4 hold data; the qed overlay allocated the two 64 KiB clusters around 2 MiB.
  assert.deepEqual(await q.allocationDepth(0, 8 * MiB), [
    { length: MiB, depth: 0 },
    { length: MiB - 64 * 1024, depth: 2 },
    { length: 128 * 1024, depth: 1 },
    { length: 3 * MiB - 64 * 1024, depth: 2 },
    { length: 3 * MiB, depth: 0 },
  ]);
  await q.close();
  await assertReadsLikeQemu(t, dir, over, false);
  assert.equal((await qemuCheck(over)).code, 0);
});

/** A child process that writes through the driver and is killed mid-way; returns the last flushed slot. */
async function writeAndKill(img: string, seed: number, killAfterMs: number): Promise<number> {
  const code = [
    `import { openVdiPath } from ${repoModule('src/formats/vdi/format.ts')};`,
    `import { prng } from ${repoModule('test/fixtures/qcow2/helpers.ts')};`,
    `const dev = await openVdiPath(${JSON.stringify(img)});`,
    `const rnd = prng(${seed}); const half = dev.sizeBytes / 2;`,
    'for (let s = 0; half + (s + 1) * 4096 <= dev.sizeBytes; s++) {',
    '  const jobs = [];',
    '  for (let k = 0; k < 2; k++) { const len = 1 + Math.floor(rnd() * 100000); jobs.push(dev.pwrite(Buffer.alloc(len, 1 + Math.floor(rnd() * 254)), Math.floor(rnd() * (half - len)))); }',
    '  jobs.push(dev.pwrite(Buffer.alloc(4096, (s % 255) + 1), half + s * 4096));',
    '  await Promise.all(jobs);',
    '  if (s % 4 === 3) { await dev.flush(); process.stdout.write(`${s}\\n`); }',
    '}',
    'await new Promise(() => undefined);',
  ].join('\n');
  return runWriterAndKill(code, killAfterMs);
}

test('vdi crash: a writer killed mid-write loses no flushed data; a writable open leaves a clean qemu-img check', async (t) => {
  if (!requirePeers(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const rnd = prng(61);
  for (let round = 0; round < 4; round++) {
    const img = join(dir, `k${round}.vdi`);
    await createVdi(img, { sizeBytes: 256 * MiB });
    const last = await writeAndKill(img, round, 20 + Math.floor(rnd() * 300));
    const pre = await qemuCheck(img);
    // At worst blocks counted but not yet mapped (QEMU reports the count mismatch as corruption).
    assert.equal(pre.json['check-errors'] ?? 0, 0, JSON.stringify(pre.json));
    const dev = await openVdiPath(img);
    const b = Buffer.alloc(4096);
    for (let s = 0; s <= last; s++) {
      await dev.pread(b, 128 * MiB + s * 4096);
      assert.ok(b.equals(Buffer.alloc(4096, (s % 255) + 1)), `flushed slot ${s} (of ${last}) lost`);
    }
    await dev.close();
    const post = await qemuCheck(img);
    assert.equal(post.code, 0, `after repair of ${dev.repairedLeakedBlocks} block(s): ${JSON.stringify(post.json)}`);
  }
});

test('vdi repair: a qemu-made image with a counted-but-unmapped tail block checks clean after a writable open', async (t) => {
  if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const img = join(dir, 'r.vdi');
  await runOk('qemu-img', ['create', '-q', '-f', 'vdi', img, String(8 * MiB)]);
  await qemuIo('vdi', img, ['write -q -P 0x21 0 1500000', 'write -q -P 0x22 5M 4096']);
  const before = await qemuContent(dir, img);
  const raw = readFileSync(img);
  raw.writeUInt32LE(raw.readUInt32LE(0x184) + 1, 0x184);
  writeFileSync(img, Buffer.concat([raw, Buffer.alloc(MiB, 0x99)]));
  const broken = await qemuCheck(img);
  assert.equal(broken.code, 2, `qemu-img check should report the count mismatch: ${JSON.stringify(broken.json)}`);
  const dev = await openVdiPath(img);
  assert.equal(dev.repairedLeakedBlocks, 1);
  await dev.close();
  const fixed = await qemuCheck(img);
  assert.equal(fixed.code, 0, JSON.stringify(fixed.json));
  assert.ok((await qemuContent(dir, img)).equals(before));
});
