// The backing-file policy as `imgbd serve` applies it: a backing (or data) file outside the
// overlay's directory tree is refused unless --allow-backing allows it; loops and over-deep
// chains are refused; a recorded format is used as is (a raw file full of qcow2 bytes stays
// raw); an unrecorded one is probed by magic; backing files are never written.

import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { copyFileSync, mkdirSync, readFileSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { createQcow2 } from '../../src/formats/qcow2/index.js';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';
import { imgbdArgv, serveImgbd, stopServe } from './qcow2-cli-helpers.js';

const MiB = 1024 * 1024;

function digest(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/** `imgbd serve` that must refuse: exit status and stderr. */
async function serveRefused(socket: string, args: readonly string[]): Promise<string> {
  const r = await run(process.execPath, imgbdArgv(['serve', '-k', socket, ...args]), { timeoutMs: 30_000 });
  assert.notEqual(r.code, 0, `serve should have refused: ${r.stdout}`);
  return r.stderr;
}

describe('backing-file policy of imgbd serve', () => {
  it('refuses a backing file outside the overlay directory tree unless --allow-backing allows it', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const outside = join(dir, 'outside');
    const vm = join(dir, 'vm');
    mkdirSync(outside);
    mkdirSync(vm);
    const base = join(outside, 'base.raw');
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', base, '4M']);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5b 0 4M', base]);
    const absolute = join(vm, 'abs.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', absolute]);
    const relative = join(vm, 'rel.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', '../outside/base.raw', '-F', 'raw', relative, '4M']);
    symlinkSync(base, join(vm, 'link.raw'));
    const viaLink = join(vm, 'link.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'link.raw', '-F', 'raw', viaLink, '4M']);

    for (const overlay of [absolute, relative, viaLink]) {
      const err = await serveRefused(join(dir, 'refused.sock'), ['-f', 'qcow2', overlay]);
      assert.match(err, /outside the allowed directories/, overlay);
      assert.match(err, /--allow-backing/, overlay);
      assert.ok(err.includes(outside), `${overlay}: the message names where the backing file really is`);
      // info names the backing file without opening it; walking the chain applies the policy.
      assert.match((await run(process.execPath, imgbdArgv(['info', overlay]))).stdout, /backing file: /);
      const chain = await run(process.execPath, imgbdArgv(['info', '--backing-chain', overlay]));
      assert.notEqual(chain.code, 0);
      assert.match(chain.stderr, /--allow-backing/);
      assert.equal((await run(process.execPath, imgbdArgv(['info', '--backing-chain', '--allow-backing', outside, overlay]))).code, 0);
    }
    const before = digest(base);
    const served = await serveImgbd(t, join(dir, 'ok.sock'), ['-f', 'qcow2', '--allow-backing', outside, '-t', '-e', '0', viaLink]);
    try {
      await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', base, served.uri]);
      await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6c 1M 64k', served.uri]);
    } finally {
      await stopServe(served);
    }
    assert.equal(digest(base), before, 'the backing file is never written');
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x6c 1M 64k', '-c', 'read -P 0x5b 0 1M', viaLink]);
  });

  it('refuses loops (self, two images) and chains deeper than the limit', async (t) => {
    if (!requirePeers(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const self = join(dir, 'self.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'self.qcow2', '-F', 'qcow2', self, '1M']);
    assert.match(await serveRefused(join(dir, 's.sock'), [self]), /loops back/);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'b.qcow2', '-F', 'qcow2', join(dir, 'a.qcow2'), '1M']);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'a.qcow2', '-F', 'qcow2', join(dir, 'b.qcow2'), '1M']);
    assert.match(await serveRefused(join(dir, 's.sock'), ['-f', 'qcow2', join(dir, 'a.qcow2')]), /loops back/);

    await runOk('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'd0'), '1M']);
    const depth = 70;
    for (let i = 1; i <= depth; i++) await createQcow2(join(dir, `d${i}`), { sizeBytes: MiB, backingFile: `d${i - 1}`, backingFormat: i === 1 ? 'raw' : 'qcow2' });
    assert.match(await serveRefused(join(dir, 's.sock'), ['-f', 'qcow2', join(dir, `d${depth}`)]), /deeper than/);
    // A chain within the limit opens.
    const ok = await serveImgbd(t, join(dir, 'ok.sock'), ['-f', 'qcow2', '-r', join(dir, 'd40')]);
    await runOk('qemu-img', ['compare', '-F', 'raw', join(dir, 'd40'), ok.uri]);
    await stopServe(ok);
  });

  it('a recorded raw backing file is never promoted; an unrecorded format is probed by magic, read-only', async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    // A raw disk whose guest data happens to be a qcow2 image (a VM that stores images).
    const inner = join(dir, 'inner.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', inner, '1M']);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 0 1M', inner]);
    const rawBase = join(dir, 'disk.raw');
    copyFileSync(inner, rawBase);
    await runOk('qemu-img', ['resize', '-q', '-f', 'raw', rawBase, '2M']);
    const overlay = join(dir, 'over.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'disk.raw', '-F', 'raw', overlay]);
    const served = await serveImgbd(t, join(dir, 'a.sock'), ['-f', 'qcow2', '-t', '-e', '0', overlay]);
    try {
      // The export shows the raw bytes (qcow2 header and all), not the inner image's contents.
      await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', rawBase, served.uri]);
    } finally {
      await stopServe(served);
    }

    // No format recorded (as in images from older tools): probed by magic, opened read-only.
    const qBase = join(dir, 'qbase.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', qBase, '2M']);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x31 0 2M', qBase]);
    const unrecorded = join(dir, 'unrecorded.qcow2');
    await createQcow2(unrecorded, { sizeBytes: 2 * MiB, backingFile: 'qbase.qcow2' });
    const before = digest(qBase);
    const s2 = await serveImgbd(t, join(dir, 'b.sock'), ['-f', 'qcow2', '-t', '-e', '0', unrecorded]);
    try {
      await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qBase, s2.uri]);
      await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x32 0 1M', '-c', 'write -z 1M 64k', s2.uri]);
    } finally {
      await stopServe(s2);
    }
    assert.equal(digest(qBase), before, 'a probed backing file is opened read-only');
    const s3 = await serveImgbd(t, join(dir, 'c.sock'), ['-f', 'qcow2', '-r', '-t', '-e', '0', unrecorded]);
    try {
      await runOk('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x32 0 1M', '-c', 'read -P 0 1M 64k', '-c', 'read -P 0x31 1114112 983040', s3.uri]);
    } finally {
      await stopServe(s3);
    }
    await runOk('qemu-img', ['check', unrecorded]);
  });

  it('refuses an external data file outside the allowed tree', async (t) => {
    if (!requirePeers(t, 'qemu-img')) return;
    const dir = tempDir(t);
    mkdirSync(join(dir, 'vm'));
    mkdirSync(join(dir, 'data'));
    const img = join(dir, 'vm', 'img.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, 'data', 'img.data')}`, img, '1M']);
    const err = await serveRefused(join(dir, 's.sock'), ['-f', 'qcow2', img]);
    assert.match(err, /data file/);
    assert.match(err, /--allow-backing/);
    const served = await serveImgbd(t, join(dir, 'ok.sock'), ['-f', 'qcow2', '--allow-backing', join(dir, 'data'), img]);
    await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, served.uri]);
    await stopServe(served);
  });
});

describe('resolveBacking', () => {
  it('confines names to the allowed roots, follows symlinks, bounds depth and refuses loops', async (t) => {
    const { BACKING_MAX_DEPTH, BackingPolicyError, resolveBacking, topBackingPolicy } = await import('../../src/formats/backing-policy.js');
    const dir = tempDir(t);
    mkdirSync(join(dir, 'vm', 'sub'), { recursive: true });
    mkdirSync(join(dir, 'other'));
    const top = join(dir, 'vm', 'top.qcow2');
    for (const f of [top, join(dir, 'vm', 'sub', 'b.raw'), join(dir, 'other', 'c.raw'), join(dir, 'vm', 'a.raw')]) copyFileSync('/dev/null', f);
    symlinkSync(join(dir, 'other', 'c.raw'), join(dir, 'vm', 'sneaky.raw'));
    const policy = await topBackingPolicy(top, undefined);
    assert.ok(policy !== false);
    assert.equal((await resolveBacking(top, 'a.raw', policy)).path, join(dir, 'vm', 'a.raw'));
    assert.equal((await resolveBacking(top, 'sub/b.raw', policy)).path, join(dir, 'vm', 'sub', 'b.raw'));
    for (const name of ['../other/c.raw', join(dir, 'other', 'c.raw'), 'sneaky.raw', '/etc/passwd']) {
      await assert.rejects(resolveBacking(top, name, policy), (e: unknown) => e instanceof BackingPolicyError && /--allow-backing/.test((e as Error).message), name);
    }
    await assert.rejects(resolveBacking(top, '', policy), BackingPolicyError);
    await assert.rejects(resolveBacking(top, 'top.qcow2', policy), /loops back/);
    // An allowed root may be a single file rather than a directory.
    const one = await topBackingPolicy(top, [join(dir, 'other', 'c.raw')]);
    assert.ok(one !== false);
    assert.equal((await resolveBacking(top, 'sneaky.raw', one)).path, join(dir, 'other', 'c.raw'));
    assert.equal(await topBackingPolicy(top, false), false);
    const any = await topBackingPolicy(top, true);
    assert.ok(any !== false);
    assert.equal((await resolveBacking(top, '/etc/passwd', any)).path, '/etc/passwd');
    // The chain grows by one per level; past the limit it is refused.
    let p = policy;
    let from = top;
    for (let i = 0; i < BACKING_MAX_DEPTH; i++) {
      const name = `d${i}`;
      copyFileSync('/dev/null', join(dir, 'vm', name));
      const r = await resolveBacking(from, name, p);
      p = r.next;
      from = r.path;
    }
    copyFileSync('/dev/null', join(dir, 'vm', 'last'));
    await assert.rejects(resolveBacking(from, 'last', p), /deeper than/);
  });
});
