// The server against real clients: qemu-img, qemu-io, nbdinfo, nbdcopy, each on a unix
// socket in a temporary directory, checked against the backing file itself.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeFileSync, writeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import type { BlockDevice, DepthExtent } from '../../src/block/device.js';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';
import { exportUri, openRawDevice, startServer } from '../helpers/server.js';

const MiB = 1024 * 1024;

function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/** A sparse file: data at [1M,1M+64K) and [5M, 6M), holes elsewhere, 8 MiB long. */
function makeSparse(path: string): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, 8 * MiB);
    writeSync(fd, randomBytes(64 * 1024), 0, 64 * 1024, MiB);
    writeSync(fd, randomBytes(MiB), 0, MiB, 5 * MiB);
  } finally {
    closeSync(fd);
  }
}

interface Span {
  offset: number;
  length: number;
  zero: boolean;
  data: boolean;
}

/** Merge neighbouring spans with equal status, so maps from different tools compare. */
function normalize(spans: Span[]): Span[] {
  const out: Span[] = [];
  for (const s of spans) {
    const last = out[out.length - 1];
    if (last && last.zero === s.zero && last.data === s.data && last.offset + last.length === s.offset) last.length += s.length;
    else out.push({ ...s });
  }
  return out;
}

test('qemu-img compare sees the same bytes through the export as in the file', async (t) => {
  if (!requirePeers(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const img = join(dir, 'disk.raw');
  writeFileSync(img, randomBytes(3 * MiB + 512));
  const srv = await startServer(t, { exports: [{ name: '', device: await openRawDevice(t, img, true), readOnly: true }] }, dir);
  await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', img, srv.uri]);
  // And a file that differs is reported as different (exit status 1).
  const other = join(dir, 'other.raw');
  const bytes = readFileSync(img);
  bytes[2 * MiB + 7] = bytes[2 * MiB + 7]! ^ 0xff;
  writeFileSync(other, bytes);
  const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', other, srv.uri]);
  assert.equal(r.code, 1, r.stdout + r.stderr);
});

test('nbdinfo --json reports size, flags, block sizes and description', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  const dir = tempDir(t);
  const rw = join(dir, 'rw.raw');
  const ro = join(dir, 'ro.raw');
  writeFileSync(rw, Buffer.alloc(2 * MiB));
  writeFileSync(ro, Buffer.alloc(MiB + 4096));
  const rwDev = await openRawDevice(t, rw);
  const srv = await startServer(
    t,
    {
      exports: [
        { name: 'rw', description: 'the writable one', device: rwDev, readOnly: false },
        { name: 'ro', device: await openRawDevice(t, ro, true), readOnly: true },
      ],
    },
    dir,
  );
  const info = JSON.parse(await runOk('nbdinfo', ['--json', exportUri(srv.socketPath, 'rw')]));
  assert.equal(info.protocol, 'newstyle-fixed');
  assert.equal(info.structured, true);
  const e = info.exports[0];
  assert.equal(e['export-name'], 'rw');
  assert.equal(e.description, 'the writable one');
  assert.equal(e['export-size'], 2 * MiB);
  assert.deepEqual(e.contexts, ['base:allocation']);
  for (const flag of ['can_cache', 'can_df', 'can_fast_zero', 'can_flush', 'can_fua', 'can_multi_conn', 'can_trim', 'can_zero']) {
    assert.equal(e[flag], true, flag);
  }
  assert.equal(e.is_read_only, false);
  // The raw driver reports what the host says about the disk under the file.
  assert.equal(e.is_rotational, rwDev.capabilities().rotational);
  assert.equal(e.block_size_minimum, 1);
  assert.equal(e.block_size_preferred, 4096);
  assert.equal(e.block_size_maximum, 32 * MiB);

  const roInfo = JSON.parse(await runOk('nbdinfo', ['--json', exportUri(srv.socketPath, 'ro')])).exports[0];
  assert.equal(roInfo['export-size'], MiB + 4096);
  assert.equal(roInfo.is_read_only, true);
  for (const flag of ['can_fast_zero', 'can_flush', 'can_fua', 'can_trim', 'can_zero']) assert.equal(roInfo[flag], false, flag);
  assert.equal(roInfo.can_multi_conn, true);
  assert.equal(roInfo.description, undefined);
});

test('nbdinfo --list --json lists every export with its description', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  const dir = tempDir(t);
  const a = join(dir, 'a.raw');
  const b = join(dir, 'b.raw');
  writeFileSync(a, Buffer.alloc(MiB));
  writeFileSync(b, Buffer.alloc(2 * MiB));
  const srv = await startServer(
    t,
    {
      exports: [
        { name: 'alpha', description: 'first', device: await openRawDevice(t, a), readOnly: false },
        { name: 'beta', description: 'second', device: await openRawDevice(t, b, true), readOnly: true },
      ],
    },
    dir,
  );
  const list = JSON.parse(await runOk('nbdinfo', ['--list', '--json', srv.uri]));
  const byName = new Map<string, { description?: string; 'export-size': number; is_read_only: boolean }>(
    list.exports.map((x: { 'export-name': string }) => [x['export-name'], x]),
  );
  assert.deepEqual([...byName.keys()].sort(), ['alpha', 'beta']);
  assert.equal(byName.get('alpha')!.description, 'first');
  assert.equal(byName.get('alpha')!['export-size'], MiB);
  assert.equal(byName.get('beta')!.description, 'second');
  assert.equal(byName.get('beta')!.is_read_only, true);
});

test('nbdinfo --map matches what SEEK_DATA/SEEK_HOLE say about the file (via qemu-img map)', async (t) => {
  if (!requirePeers(t, 'nbdinfo', 'qemu-img')) return;
  const dir = tempDir(t);
  const img = join(dir, 'sparse.raw');
  makeSparse(img);
  const srv = await startServer(t, { exports: [{ name: '', device: await openRawDevice(t, img, true), readOnly: true }] }, dir);
  const fromFile = JSON.parse(await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', img])) as { start: number; length: number; zero: boolean; data: boolean }[];
  const want = normalize(fromFile.map((m) => ({ offset: m.start, length: m.length, zero: m.zero, data: m.data })));
  const got = JSON.parse(await runOk('nbdinfo', ['--map', '--json', srv.uri])) as { offset: number; length: number; type: number }[];
  // base:allocation: bit 0 hole, bit 1 zero.
  const mapped = normalize(got.map((m) => ({ offset: m.offset, length: m.length, zero: (m.type & 2) !== 0, data: (m.type & 1) === 0 })));
  assert.deepEqual(mapped, want);
  // The layout we made is visible: a data extent at 1 MiB and one at 5 MiB.
  assert.ok(mapped.some((s) => s.data && s.offset <= MiB && s.offset + s.length >= MiB + 65536));
  assert.ok(mapped.some((s) => !s.data && s.zero && s.offset <= 2 * MiB && s.offset + s.length >= 5 * MiB));
});

test('qemu:allocation-depth is offered when the device reports depth', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  const dir = tempDir(t);
  const img = join(dir, 'd.raw');
  writeFileSync(img, Buffer.alloc(MiB));
  const raw = await openRawDevice(t, img, true);
  // A device whose first half is "allocated in the top image" and second half unallocated.
  const layered: BlockDevice = Object.assign(Object.create(raw) as BlockDevice, {
    capabilities: () => ({ ...raw.capabilities(), allocationDepth: true }),
    allocationDepth: async (offset: number, length: number): Promise<DepthExtent[]> => {
      const half = MiB / 2;
      const out: DepthExtent[] = [];
      if (offset < half) out.push({ length: Math.min(half, offset + length) - offset, depth: 1 });
      if (offset + length > half) out.push({ length: offset + length - Math.max(half, offset), depth: 0 });
      return out;
    },
  });
  const srv = await startServer(t, { exports: [{ name: 'x', device: layered, readOnly: true }] }, dir);
  const info = JSON.parse(await runOk('nbdinfo', ['--json', exportUri(srv.socketPath, 'x')]));
  assert.deepEqual(info.exports[0].contexts.sort(), ['base:allocation', 'qemu:allocation-depth']);
  const map = JSON.parse(await runOk('nbdinfo', ['--map=qemu:allocation-depth', '--json', exportUri(srv.socketPath, 'x')]));
  assert.deepEqual(
    map.map((m: { offset: number; length: number; type: number }) => [m.offset, m.length, m.type]),
    [
      [0, MiB / 2, 1],
      [MiB / 2, MiB / 2, 0],
    ],
  );
});

test('nbdcopy to and from the export, one and four connections', async (t) => {
  if (!requirePeers(t, 'nbdcopy')) return;
  const dir = tempDir(t);
  const img = join(dir, 'target.raw');
  writeFileSync(img, Buffer.alloc(0));
  ftruncateSync(openSync(img, 'r+'), 24 * MiB);
  const src = join(dir, 'src.bin');
  const content = Buffer.concat([randomBytes(9 * MiB), Buffer.alloc(6 * MiB), randomBytes(9 * MiB)]);
  writeFileSync(src, content);
  const srv = await startServer(t, { exports: [{ name: '', device: await openRawDevice(t, img), readOnly: false }] }, dir);
  await runOk('nbdcopy', [src, srv.uri]);
  assert.equal(sha256(img), sha256(src));
  const back = join(dir, 'back.bin');
  await runOk('nbdcopy', [srv.uri, back]);
  assert.equal(sha256(back), sha256(src));
  // Four connections each way (multi-conn is advertised for raw files).
  const src2 = join(dir, 'src2.bin');
  writeFileSync(src2, randomBytes(24 * MiB));
  await runOk('nbdcopy', ['--connections=4', '--requests=16', src2, srv.uri]);
  assert.equal(sha256(img), sha256(src2));
  const back2 = join(dir, 'back2.bin');
  await runOk('nbdcopy', ['--connections=4', srv.uri, back2]);
  assert.equal(sha256(back2), sha256(src2));
});

test('qemu-io write/read/discard/write-zeroes/flush land in the file', async (t) => {
  if (!requirePeers(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const img = join(dir, 'io.raw');
  writeFileSync(img, Buffer.alloc(4 * MiB, 0x11));
  const srv = await startServer(t, { exports: [{ name: '', device: await openRawDevice(t, img), readOnly: false }] }, dir);
  const out = await runOk('qemu-io', [
    '-f', 'raw', srv.uri,
    '-c', 'write -P 0xab 4096 65536',
    '-c', 'read -P 0xab 4096 65536',
    '-c', 'write -z 1048576 131072',
    '-c', 'discard 2097152 65536',
    '-c', 'write -P 0xcd -f 3145728 512', // FUA write
    '-c', 'flush',
    '-c', 'read -P 0x11 0 4096',
  ]);
  assert.doesNotMatch(out, /Pattern verification failed|error/i);
  const f = readFileSync(img);
  assert.ok(f.subarray(4096, 4096 + 65536).every((b) => b === 0xab));
  assert.equal(f[4095], 0x11);
  assert.equal(f[4096 + 65536], 0x11);
  assert.ok(f.subarray(MiB, MiB + 131072).every((b) => b === 0));
  assert.equal(f[MiB + 131072], 0x11);
  // Discard is advisory, but on a raw file it punches a hole, which reads as zeros.
  assert.ok(f.subarray(2 * MiB, 2 * MiB + 65536).every((b) => b === 0));
  assert.ok(f.subarray(3 * MiB, 3 * MiB + 512).every((b) => b === 0xcd));
  // A pattern mismatch is reported: the server is not just saying yes.
  const bad = await run('qemu-io', ['-f', 'raw', srv.uri, '-c', 'read -P 0x22 4096 512']);
  assert.match(bad.stdout + bad.stderr, /Pattern verification failed/);
});

test('qemu-io writes to a read-only export fail with EPERM and leave the file alone', async (t) => {
  if (!requirePeers(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const img = join(dir, 'ro.raw');
  writeFileSync(img, Buffer.alloc(MiB, 0x5a));
  const srv = await startServer(t, { exports: [{ name: '', device: await openRawDevice(t, img, true), readOnly: true }] }, dir);
  const r = await run('qemu-io', ['-f', 'raw', '-r', srv.uri, '-c', 'read -P 0x5a 0 4096']);
  assert.equal(r.code, 0, r.stderr);
  const w = await run('qemu-io', ['-f', 'raw', srv.uri, '-c', 'write -P 0 0 4096']);
  assert.match(w.stdout + w.stderr, /read-only|Operation not permitted|Permission denied/i);
  assert.ok(readFileSync(img).every((b) => b === 0x5a));
});
