// Structured reads over a raw socket against a sparse file: holes come back as OFFSET_HOLE
// chunks where SEEK_HOLE says so, DF gets exactly one OFFSET_DATA chunk, reassembly equals
// the file, and concurrent requests all get their own replies.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/peers.js';
import { openRawDevice, RawNbdClient, startServer } from '../helpers/server.js';

const MiB = 1024 * 1024;
const READ = 0;
const DF = 4;

/** 4 MiB: data at [0, 64K) and [1M+128K, 1M+192K), holes elsewhere. */
function makeSparse(path: string): Buffer {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, 4 * MiB);
  writeSync(fd, randomBytes(65536), 0, 65536, 0);
  writeSync(fd, randomBytes(65536), 0, 65536, MiB + 131072);
  closeSync(fd);
  return readFileSync(path);
}

/** `data` as dir/data.raw. */
function writeImage(dir: string, data: Buffer): string {
  const img = join(dir, 'data.raw');
  const fd = openSync(img, 'w');
  writeSync(fd, data);
  closeSync(fd);
  return img;
}

interface Chunk {
  flags: number;
  type: number;
  cookie: bigint;
  payload: Buffer;
}

async function readAll(c: RawNbdClient): Promise<Chunk[]> {
  const chunks: Chunk[] = [];
  for (;;) {
    const ch = await c.chunk();
    chunks.push(ch);
    if (ch.flags & 1) return chunks;
  }
}

/** Rebuild [offset, offset+length) from content chunks, checking bounds and overlap. */
function reassemble(chunks: Chunk[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length, 0xee);
  const covered = new Uint8Array(length);
  for (const ch of chunks) {
    let at: number;
    let n: number;
    if (ch.type === 1) {
      at = Number(ch.payload.readBigUInt64BE(0)) - offset;
      n = ch.payload.length - 8;
      ch.payload.copy(out, at, 8);
    } else if (ch.type === 2) {
      assert.equal(ch.payload.length, 12);
      at = Number(ch.payload.readBigUInt64BE(0)) - offset;
      n = ch.payload.readUInt32BE(8);
      out.fill(0, at, at + n);
    } else {
      assert.equal(ch.type, 0, `unexpected chunk type ${ch.type}`);
      continue;
    }
    assert.ok(at >= 0 && at + n <= length && n > 0, 'chunk outside the request');
    for (let i = at; i < at + n; i++) {
      assert.equal(covered[i], 0, 'overlapping chunks');
      covered[i] = 1;
    }
  }
  assert.ok(covered.every((x) => x === 1), 'request not fully covered');
  return out;
}

test('structured reads send holes as OFFSET_HOLE and honour DF', async (t) => {
  const dir = tempDir(t);
  const img = join(dir, 'sparse.raw');
  const file = makeSparse(img);
  const srv = await startServer(t, { exports: [{ name: '', device: await openRawDevice(t, img, true), readOnly: true }] }, dir);
  const c = await RawNbdClient.open(srv.socketPath);
  t.after(() => c.destroy());
  await c.go('');

  // 2 MiB across data, hole, data, hole.
  c.request(READ, 0, 1n, 0n, 2 * MiB);
  const chunks = await readAll(c);
  assert.ok(chunks.every((ch) => ch.cookie === 1n));
  assert.deepEqual(
    chunks.map((ch) => ch.type),
    [1, 2, 1, 2],
    'data, hole, data, hole in offset order',
  );
  assert.ok(reassemble(chunks, 0, 2 * MiB).equals(file.subarray(0, 2 * MiB)));

  // DF: one OFFSET_DATA chunk with the zeros present.
  c.request(READ, DF, 2n, 0n, 256 * 1024);
  const df = await readAll(c);
  assert.deepEqual(df.map((ch) => ch.type), [1]);
  assert.ok(reassemble(df, 0, 256 * 1024).equals(file.subarray(0, 256 * 1024)));

  // A read wholly inside a hole is a single OFFSET_HOLE chunk.
  c.request(READ, 0, 3n, BigInt(2 * MiB), MiB);
  const hole = await readAll(c);
  assert.deepEqual(hole.map((ch) => [ch.type, ch.payload.readUInt32BE(8)]), [[2, MiB]]);

  // Small reads stay a single data chunk.
  c.request(READ, 0, 4n, 100n, 4000);
  const small = await readAll(c);
  assert.deepEqual(small.map((ch) => ch.type), [1]);
  assert.ok(reassemble(small, 100, 4000).equals(file.subarray(100, 4100)));
});

test('many concurrent reads each get their reply, in any order', async (t) => {
  const dir = tempDir(t);
  const data = randomBytes(8 * MiB);
  const img = writeImage(dir, data);
  const srv = await startServer(t, { exports: [{ name: '', device: await openRawDevice(t, img, true), readOnly: true }] }, dir);
  const c = await RawNbdClient.open(srv.socketPath);
  t.after(() => c.destroy());
  await c.go('', { structured: false });
  const n = 500;
  const offsets = Array.from({ length: n }, (_, i) => ((i * 7919) % 2048) * 4096);
  offsets.forEach((off, i) => c.request(READ, 0, BigInt(i + 1), BigInt(off), 4096));
  const seen = new Set<bigint>();
  for (let i = 0; i < n; i++) {
    const r = await c.simpleReply();
    assert.equal(r.error, 0);
    assert.ok(!seen.has(r.cookie));
    seen.add(r.cookie);
    const off = offsets[Number(r.cookie) - 1]!;
    assert.ok((await c.read(4096)).equals(data.subarray(off, off + 4096)));
  }
  assert.equal(seen.size, n);
});

// Large reads of a cached file leave with sendfile(2) where the kernel has it: the replies
// must stay whole and in order with the copied small replies around them, also when the
// client stops reading until the socket is full and the zero-copy send is cut short.
for (const structured of [false, true]) {
  test(`large reads mixed with small ones arrive intact past a congested socket (${structured ? 'structured' : 'simple'} replies)`, async (t) => {
    const dir = tempDir(t);
    const data = randomBytes(32 * MiB);
    const img = writeImage(dir, data);
    readFileSync(img); // in the page cache, so the zero-copy path is taken
    const srv = await startServer(t, { exports: [{ name: '', device: await openRawDevice(t, img, true), readOnly: true }] }, dir);
    const c = await RawNbdClient.open(srv.socketPath);
    t.after(() => c.destroy());
    await c.go('', { structured });
    const reqs = Array.from({ length: 96 }, (_, i) => {
      const length = i % 3 === 2 ? 1000 + i : MiB + 333 * i;
      return { offset: (i * 2654435761) % (data.length - length), length, df: structured && i % 5 === 0 };
    });
    c.pause();
    reqs.forEach((r, i) => c.request(READ, r.df ? DF : 0, BigInt(i + 1), BigInt(r.offset), r.length));
    // Let the server fill the socket and queue behind it before anything is read.
    await new Promise((resolve) => setTimeout(resolve, 200));
    c.resume();
    const seen = new Set<number>();
    for (let n = 0; n < reqs.length; n++) {
      let cookie: number;
      let got: Buffer;
      if (structured) {
        const chunks = await readAll(c);
        cookie = Number(chunks[0]!.cookie);
        assert.ok(chunks.every((ch) => Number(ch.cookie) === cookie));
        const r = reqs[cookie - 1]!;
        got = reassemble(chunks, r.offset, r.length);
      } else {
        const reply = await c.simpleReply();
        assert.equal(reply.error, 0);
        cookie = Number(reply.cookie);
        got = await c.read(reqs[cookie - 1]!.length);
      }
      const r = reqs[cookie - 1]!;
      assert.ok(!seen.has(cookie), `cookie ${cookie} answered twice`);
      seen.add(cookie);
      assert.ok(got.equals(data.subarray(r.offset, r.offset + r.length)), `read ${cookie} [${r.offset}, +${r.length}) differs`);
    }
    assert.equal(seen.size, reqs.length);
  });
}

test('requests sent right behind NBD_OPT_GO, before its reply, are served (large writes too)', async (t) => {
  const dir = tempDir(t);
  const before = randomBytes(4 * MiB);
  const img = writeImage(dir, before);
  const srv = await startServer(t, { exports: [{ name: '', device: await openRawDevice(t, img), readOnly: false }] }, dir);
  const c = await RawNbdClient.open(srv.socketPath);
  t.after(() => c.destroy());
  await c.greet();
  const payload = randomBytes(MiB + 17);
  // GO, a large write and a read elsewhere in one go: the server changes sockets in between.
  c.option(7, Buffer.from('00000000' + '0000', 'hex'));
  c.request(1, 0, 1n, 4096n, payload.length, payload);
  c.request(READ, 0, 2n, BigInt(3 * MiB), 4096);
  const replies = await c.optReplies();
  assert.equal(replies[replies.length - 1]!.type, 1, 'NBD_REP_ACK');
  const seen = new Set<bigint>();
  for (let i = 0; i < 2; i++) {
    const r = await c.simpleReply();
    assert.equal(r.error, 0);
    seen.add(r.cookie);
    if (r.cookie === 2n) assert.ok((await c.read(4096)).equals(before.subarray(3 * MiB, 3 * MiB + 4096)));
  }
  assert.deepEqual([...seen].sort(), [1n, 2n]);
  c.request(READ, 0, 3n, 4096n, payload.length);
  const r = await c.simpleReply();
  assert.deepEqual([r.cookie, r.error], [3n, 0]);
  assert.ok((await c.read(payload.length)).equals(payload));
  assert.ok(readFileSync(img).subarray(4096, 4096 + payload.length).equals(payload));
});
