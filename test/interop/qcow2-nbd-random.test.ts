// Seeded random writes, write-zeroes and trims (aligned and unaligned, 1 byte to 4 MiB) sent
// through `imgbd serve` with imgbd's NBD client, and the same operations replayed by qemu-io on
// a twin image: the two must compare equal and both pass qemu-img check with no errors and no
// leaks. Once on a standalone image, once on an overlay over a raw <- qcow2 backing chain.

import { strict as assert } from 'node:assert';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { NbdClient } from '../../src/client/index.js';
import { requirePeers, runOk, tempDir } from '../helpers/peers.js';
import { runImgbdOk, serveImgbd, stopServe } from './qcow2-cli-helpers.js';

const MiB = 1024 * 1024;
const OPS = 2000;
const MAX_LEN = 4 * MiB;

/** mulberry32: a small seeded generator, so a failure replays exactly. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Op =
  | { kind: 'write'; offset: number; length: number; fua: boolean; pattern: number | 'file' }
  | { kind: 'zero'; offset: number; length: number; fua: boolean; mayTrim: boolean }
  | { kind: 'trim'; offset: number; length: number }
  | { kind: 'flush' };

function makeOps(seed: number, sizeBytes: number): Op[] {
  const r = rng(seed);
  const ops: Op[] = [];
  for (let i = 0; i < OPS; i++) {
    if (r() < 0.03) {
      ops.push({ kind: 'flush' });
      continue;
    }
    // Lengths spread over 1 byte .. 4 MiB on a log scale; offsets aligned to 64K, 4K, 512 or not.
    let length = Math.max(1, Math.min(MAX_LEN, Math.floor(2 ** (r() * 22))));
    const align = [65536, 4096, 512, 1][Math.floor(r() * 4)]!;
    if (align > 1 && r() < 0.7) length = Math.max(align, Math.floor(length / align) * align);
    let offset = Math.floor((r() * (sizeBytes - length)) / align) * align;
    if (offset + length > sizeBytes) offset = sizeBytes - length;
    const p = r();
    if (p < 0.6) ops.push({ kind: 'write', offset, length, fua: r() < 0.1, pattern: r() < 0.5 ? 'file' : 1 + Math.floor(r() * 254) });
    else if (p < 0.8) ops.push({ kind: 'zero', offset, length, fua: r() < 0.1, mayTrim: r() < 0.5 });
    else ops.push({ kind: 'trim', offset, length });
  }
  return ops;
}

function qemuIoCommand(op: Op, patternFile: string): string {
  switch (op.kind) {
    case 'write':
      return `write -q ${op.fua ? '-f ' : ''}${op.pattern === 'file' ? `-s ${patternFile}` : `-P ${op.pattern}`} ${op.offset} ${op.length}`;
    case 'zero':
      return `write -q -z ${op.mayTrim ? '-u ' : ''}${op.fua ? '-f ' : ''}${op.offset} ${op.length}`;
    case 'trim':
      return `discard -q ${op.offset} ${op.length}`;
    case 'flush':
      return 'flush';
  }
}

async function sendOps(uri: string, ops: readonly Op[], pattern: Buffer): Promise<void> {
  const client = await NbdClient.connect(uri);
  try {
    for (const op of ops) {
      switch (op.kind) {
        case 'write':
          await client.pwrite(op.pattern === 'file' ? pattern.subarray(0, op.length) : Buffer.alloc(op.length, op.pattern), op.offset, { fua: op.fua });
          break;
        case 'zero':
          await client.zero(op.offset, op.length, { fua: op.fua, noHole: !op.mayTrim });
          break;
        case 'trim':
          await client.trim(op.offset, op.length);
          break;
        case 'flush':
          await client.flush();
          break;
      }
    }
    await client.flush();
  } finally {
    await client.disconnect();
  }
}

async function assertClean(image: string): Promise<void> {
  const r = JSON.parse(await runOk('qemu-img', ['check', '--output=json', image])) as Record<string, number | undefined>;
  assert.equal(r['check-errors'], 0, `${image}: check errors`);
  assert.equal(r.corruptions ?? 0, 0, `${image}: corruptions`);
  assert.equal(r.leaks ?? 0, 0, `${image}: leaks`);
  assert.deepEqual(JSON.parse(await runImgbdOk(['check', '--json', image])), r, `${image}: imgbd check agrees with qemu-img check`);
}

async function twinRun(t: TestContext, dir: string, image: string, twin: string, seed: number): Promise<void> {
  const sizeBytes = (JSON.parse(await runOk('qemu-img', ['info', '--output=json', image])) as { 'virtual-size': number })['virtual-size'];
  const pattern = Buffer.alloc(MAX_LEN);
  const r = rng(seed ^ 0x5eed);
  for (let i = 0; i < pattern.length; i += 4) pattern.writeUInt32LE(Math.floor(r() * 2 ** 32), i);
  const patternFile = join(dir, 'pattern.bin');
  writeFileSync(patternFile, pattern);
  const ops = makeOps(seed, sizeBytes);
  assert.ok(ops.filter((o) => o.kind !== 'flush').length >= 1900);

  const served = await serveImgbd(t, join(dir, 'nbd.sock'), ['-f', 'qcow2', image]);
  try {
    await sendOps(served.uri, ops, pattern);
  } finally {
    await stopServe(served);
  }
  // One qemu-io process replays everything in order, as the NBD client sent it.
  const cmds = ops.map((o) => qemuIoCommand(o, patternFile));
  for (let i = 0; i < cmds.length; i += 500) {
    await runOk('qemu-io', ['-f', 'qcow2', ...cmds.slice(i, i + 500).flatMap((c) => ['-c', c]), twin], { timeoutMs: 300_000 });
  }
  await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', image, twin]);
  await assertClean(image);
  await assertClean(twin);
}

describe('random I/O through imgbd serve matches qemu-io on a twin', () => {
  it('standalone qcow2 image (64 MiB, 64K clusters)', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const image = join(dir, 'a.qcow2');
    const twin = join(dir, 'b.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(64 * MiB)]);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', twin, String(64 * MiB)]);
    await twinRun(t, dir, image, twin, 20261125);
  });

  it('extended-L2 image (48 MiB, 16K clusters)', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const image = join(dir, 'a.qcow2');
    const twin = join(dir, 'b.qcow2');
    for (const p of [image, twin]) await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=16k', p, String(48 * MiB)]);
    await twinRun(t, dir, image, twin, 777);
  });

  it('overlay over a raw <- qcow2 backing chain', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const base = join(dir, 'base.raw');
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', base, String(48 * MiB)]);
    await runOk('qemu-io', ['-f', 'raw', '-c', `write -P 0x3c 0 ${48 * MiB}`, '-c', `write -z ${8 * MiB} ${4 * MiB}`, base]);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', '-o', 'cluster_size=32k', join(dir, 'mid.qcow2'), String(56 * MiB)]);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x4d ${4 * MiB} ${6 * MiB}`, '-c', `write -z ${20 * MiB} ${MiB}`, '-c', `write -P 0x5e ${50 * MiB} ${MiB}`, join(dir, 'mid.qcow2')]);
    const image = join(dir, 'top.qcow2');
    const twin = join(dir, 'twin.qcow2');
    for (const p of [image, twin]) await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', p, String(64 * MiB)]);
    await twinRun(t, dir, image, twin, 4242);
  });
});
