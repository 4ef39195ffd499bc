// Malformed and hostile clients over a raw unix socket: each case gets its own connection and
// expects a precise reply or a disconnect; the server must keep serving good clients
// throughout (checked with nbdinfo and a raw client afterwards). Messages are built by hand
// here, not with the codec under test.

import { test } from 'node:test';
import fc from 'fast-check';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requirePeers, runOk, tempDir, waitFor } from '../helpers/peers.js';
import { infoRequest, metaRequest, OPT, openRawDevice, RawNbdClient as RawClient, REP, startServer } from '../helpers/server.js';

const MiB = 1024 * 1024;
const IHAVEOPT = Buffer.from('IHAVEOPT');
const REQUEST_MAGIC = 0x25609513;
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 };
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const HANDSHAKE_TIMEOUT_MS = 400;
const STALL_TIMEOUT_MS = 400;

/** A read that must succeed with a simple reply: proves the stream is still in sync. */
async function readWorksSimple(c: RawClient, cookie: bigint): Promise<void> {
  c.request(CMD.READ, 0, cookie, 0n, 512);
  const r = await c.simpleReply();
  assert.deepEqual(r, { error: 0, cookie });
  const data = await c.read(512);
  assert.ok(data.every((b) => b === 0x42));
}

async function readWorksStructured(c: RawClient, cookie: bigint): Promise<void> {
  c.request(CMD.READ, 0, cookie, 512n, 512);
  const ch = await c.chunk();
  assert.equal(ch.cookie, cookie);
  assert.equal(ch.type, 1);
  assert.equal(ch.payload.readBigUInt64BE(0), 512n);
  assert.ok(ch.payload.subarray(8).every((b) => b === 0x42));
}

interface Case {
  readonly name: string;
  readonly run: (c: RawClient) => Promise<void>;
}

const CASES: Case[] = [
  // ---- handshake ----
  { name: 'unknown client flags', run: async (c) => { await c.greet(0x80 | 3); await c.expectClosed(); } },
  { name: 'bad option magic', run: async (c) => { await c.greet(); c.write(Buffer.from('IHAVEOPX\0\0\0\x07\0\0\0\0', 'latin1')); await c.expectClosed(); } },
  { name: 'truncated option header, then hang up', run: async (c) => { await c.greet(); c.write(IHAVEOPT.subarray(0, 5)); c.destroy(); } },
  { name: 'option length that lies (stalls the handshake)', run: async (c) => { await c.greet(); c.option(OPT.GO, Buffer.alloc(10), 100); await c.expectClosed(HANDSHAKE_TIMEOUT_MS * 10); } },
  { name: 'a client that stalls after the greeting', run: async (c) => { await c.read(18); await c.expectClosed(HANDSHAKE_TIMEOUT_MS * 10); } },
  { name: 'INFO with a name length past the data', run: async (c) => { await c.greet(); c.option(OPT.INFO, infoRequest('rw', [], 1000)); await c.expectOptError(OPT.INFO, REP.ERR_INVALID); c.option(OPT.ABORT); assert.equal((await c.optReply()).type, REP.ACK); await c.expectClosed(); } },
  { name: 'GO whose info count disagrees with its length', run: async (c) => { await c.greet(); const d = infoRequest('rw', [3]); d.writeUInt16BE(5, 4 + 2); c.option(OPT.GO, d); await c.expectOptError(OPT.GO, REP.ERR_INVALID); } },
  { name: 'GO for an unknown export', run: async (c) => { await c.greet(); c.option(OPT.GO, infoRequest('nope', [])); await c.expectOptError(OPT.GO, REP.ERR_UNKNOWN); } },
  { name: 'EXPORT_NAME for an unknown export', run: async (c) => { await c.greet(); c.option(OPT.EXPORT_NAME, Buffer.from('nope')); await c.expectClosed(); } },
  { name: 'unknown option', run: async (c) => { await c.greet(); c.option(99, Buffer.from('xyz')); await c.expectOptError(99, REP.ERR_UNSUP); } },
  { name: 'EXTENDED_HEADERS is unsupported', run: async (c) => { await c.greet(); c.option(OPT.EXTENDED_HEADERS); await c.expectOptError(OPT.EXTENDED_HEADERS, REP.ERR_UNSUP); } },
  { name: 'LIST with data', run: async (c) => { await c.greet(); c.option(OPT.LIST, Buffer.from('x')); await c.expectOptError(OPT.LIST, REP.ERR_INVALID); } },
  { name: 'STARTTLS on a server without TLS', run: async (c) => { await c.greet(); c.option(OPT.STARTTLS); await c.expectOptError(OPT.STARTTLS, REP.ERR_POLICY); } },
  { name: 'SET_META_CONTEXT before STRUCTURED_REPLY', run: async (c) => { await c.greet(); c.option(OPT.SET_META, metaRequest('rw', ['base:allocation'])); await c.expectOptError(OPT.SET_META, REP.ERR_INVALID); } },
  { name: 'meta context query length past the data', run: async (c) => { await c.greet(); c.option(OPT.STRUCTURED_REPLY); await c.optReply(); const d = metaRequest('rw', ['base:allocation']); d.writeUInt32BE(999, 4 + 2 + 4); c.option(OPT.LIST_META, d); await c.expectOptError(OPT.LIST_META, REP.ERR_INVALID); } },
  { name: 'STRUCTURED_REPLY twice', run: async (c) => { await c.greet(); c.option(OPT.STRUCTURED_REPLY); assert.equal((await c.optReply()).type, REP.ACK); c.option(OPT.STRUCTURED_REPLY); await c.expectOptError(OPT.STRUCTURED_REPLY, REP.ERR_INVALID); } },
  {
    name: 'huge option data is refused and drained, and the next option works',
    run: async (c) => {
      await c.greet();
      c.option(OPT.LIST, Buffer.alloc(MiB, 0x77));
      await c.expectOptError(OPT.LIST, REP.ERR_TOO_BIG);
      c.option(OPT.LIST);
      const list = await c.optReplies();
      assert.deepEqual(list.map((r) => r.type), [REP.SERVER, REP.SERVER, REP.ACK]);
    },
  },
  { name: 'option length 2^32-1 with no data', run: async (c) => { await c.greet(); c.option(OPT.INFO, Buffer.alloc(0), 0xffffffff); await c.expectOptError(OPT.INFO, REP.ERR_TOO_BIG); } },
  // ---- transmission ----
  { name: 'options after GO (IHAVEOPT where a request belongs)', run: async (c) => { await c.go('rw'); c.option(OPT.LIST); await c.expectClosed(); } },
  { name: 'bad request magic', run: async (c) => { await c.go('rw'); const h = Buffer.alloc(28); h.writeUInt32BE(0x12560953); c.write(h); await c.expectClosed(); } },
  { name: 'truncated request, then hang up', run: async (c) => { await c.go('rw'); const h = Buffer.alloc(12); h.writeUInt32BE(REQUEST_MAGIC); c.write(h); c.destroy(); } },
  { name: 'offset 2^64-1', run: async (c) => { await c.go('rw'); c.request(CMD.READ, 0, 1n, 0xffffffffffffffffn, 512); assert.equal(await c.errorChunk(1n), EINVAL); await readWorksStructured(c, 2n); } },
  { name: 'offset + length past the end (read EINVAL, write ENOSPC)', run: async (c) => { await c.go('rw'); c.request(CMD.READ, 0, 1n, BigInt(4 * MiB - 256), 512); assert.equal(await c.errorChunk(1n), EINVAL); c.request(CMD.WRITE, 0, 2n, BigInt(4 * MiB), 512, Buffer.alloc(512)); assert.equal(await c.errorChunk(2n), ENOSPC); c.request(CMD.TRIM, 0, 3n, BigInt(4 * MiB), 4096); assert.equal(await c.errorChunk(3n), EINVAL); await readWorksStructured(c, 4n); } },
  { name: 'read of 4 GiB - 1', run: async (c) => { await c.go('rw'); c.request(CMD.READ, 0, 1n, 0n, 0xffffffff); assert.equal(await c.errorChunk(1n), EINVAL); await readWorksStructured(c, 2n); } },
  { name: 'write of 4 GiB - 1 (beyond any drain) disconnects', run: async (c) => { await c.go('rw'); c.request(CMD.WRITE, 0, 1n, 0n, 0xffffffff); await c.expectClosed(); } },
  {
    name: 'write over the maximum payload is refused and its payload drained',
    run: async (c) => {
      await c.go('rw', { structured: false });
      c.request(CMD.WRITE, 0, 1n, 0n, 33 * MiB, Buffer.alloc(33 * MiB, 0xee));
      assert.deepEqual(await c.simpleReply(), { error: EINVAL, cookie: 1n });
      await readWorksSimple(c, 2n);
    },
  },
  { name: 'write to a read-only export', run: async (c) => { await c.go('ro', { structured: false }); c.request(CMD.WRITE, 0, 1n, 0n, 512, Buffer.alloc(512, 1)); assert.deepEqual(await c.simpleReply(), { error: EPERM, cookie: 1n }); c.request(CMD.WRITE_ZEROES, 0, 2n, 0n, 512); assert.equal((await c.simpleReply()).error, EINVAL); await readWorksSimple(c, 3n); } },
  { name: 'unknown command', run: async (c) => { await c.go('rw', { structured: false }); c.request(99, 0, 1n, 0n, 0); assert.deepEqual(await c.simpleReply(), { error: EINVAL, cookie: 1n }); await readWorksSimple(c, 2n); } },
  { name: 'unknown command flag', run: async (c) => { await c.go('rw', { structured: false }); c.request(CMD.READ, 0x8000, 1n, 0n, 512); assert.deepEqual(await c.simpleReply(), { error: EINVAL, cookie: 1n }); await readWorksSimple(c, 2n); } },
  { name: 'flags documented for other commands (NO_HOLE on write, REQ_ONE on read)', run: async (c) => { await c.go('rw'); c.request(CMD.WRITE, 2, 1n, 0n, 4, Buffer.alloc(4)); assert.equal(await c.errorChunk(1n), EINVAL); c.request(CMD.READ, 8, 2n, 0n, 512); assert.equal(await c.errorChunk(2n), EINVAL); await readWorksStructured(c, 3n); } },
  { name: 'DF without structured replies', run: async (c) => { await c.go('rw', { structured: false }); c.request(CMD.READ, 4, 1n, 0n, 512); assert.deepEqual(await c.simpleReply(), { error: EINVAL, cookie: 1n }); await readWorksSimple(c, 2n); } },
  { name: 'BLOCK_STATUS without a metadata context', run: async (c) => { await c.go('rw'); c.request(CMD.BLOCK_STATUS, 0, 1n, 0n, 4096); assert.equal(await c.errorChunk(1n), EINVAL); await readWorksStructured(c, 2n); } },
  { name: 'FLUSH with a nonzero offset', run: async (c) => { await c.go('rw', { structured: false }); c.request(CMD.FLUSH, 0, 1n, 4096n, 0); assert.deepEqual(await c.simpleReply(), { error: EINVAL, cookie: 1n }); c.request(CMD.FLUSH, 0, 2n, 0n, 0); assert.deepEqual(await c.simpleReply(), { error: 0, cookie: 2n }); } },
  {
    name: 'BLOCK_STATUS with REQ_ONE returns exactly one descriptor no longer than asked',
    run: async (c) => {
      await c.go('rw', { meta: true });
      c.request(CMD.BLOCK_STATUS, 8, 1n, 0n, 1000);
      const ch = await c.chunk();
      assert.equal(ch.type, 5);
      assert.equal(ch.flags & 1, 1);
      assert.equal(ch.payload.length, 12);
      assert.ok(ch.payload.readUInt32BE(4) <= 1000 && ch.payload.readUInt32BE(4) > 0);
    },
  },
  { name: 'write payload cut short, then hang up', run: async (c) => { await c.go('rw'); c.request(CMD.WRITE, 0, 1n, 0n, 4096, Buffer.alloc(100)); c.destroy(); } },
  {
    name: 'DISC answers in-flight requests first, then closes',
    run: async (c) => {
      await c.go('rw', { structured: false });
      c.request(CMD.READ, 0, 1n, 0n, 512);
      c.request(CMD.DISC, 0, 2n, 0n, 0);
      assert.deepEqual(await c.simpleReply(), { error: 0, cookie: 1n });
      await c.read(512);
      await c.expectClosed();
    },
  },
  {
    name: 'a client that never reads its replies is paused, then dropped',
    run: async (c) => {
      await c.go('rw', { structured: false });
      c.pause();
      // 64 MiB of replies asked for, far over the 2 MiB in-flight budget of this server.
      for (let i = 0; i < 1024; i++) c.request(CMD.READ, 0, BigInt(i + 1), 0n, 64 * 1024);
      await new Promise((r) => setTimeout(r, STALL_TIMEOUT_MS * 4));
      c.resume();
      // What the kernel buffered arrives, then the connection ends well short of 64 MiB.
      let replies = 0;
      try {
        for (; replies < 1024; replies++) {
          await c.simpleReply();
          await c.read(64 * 1024);
        }
      } catch {
        // closed mid-stream: expected
      }
      assert.ok(replies < 1024, `all ${replies} replies were sent to a client that did not read`);
      await c.expectClosed();
    },
  },
];

test('malformed and hostile clients get the expected reply or disconnect; good clients carry on', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  assert.ok(CASES.length >= 25);
  const dir = tempDir(t);
  const rw = join(dir, 'rw.raw');
  const ro = join(dir, 'ro.raw');
  writeFileSync(rw, Buffer.alloc(4 * MiB, 0x42));
  writeFileSync(ro, Buffer.alloc(MiB, 0x42));
  const srv = await startServer(
    t,
    {
      exports: [
        { name: 'rw', device: await openRawDevice(t, rw), readOnly: false },
        { name: 'ro', device: await openRawDevice(t, ro, true), readOnly: true },
      ],
      limits: { handshakeTimeoutMs: HANDSHAKE_TIMEOUT_MS, stallTimeoutMs: STALL_TIMEOUT_MS, maxInFlightBytes: 2 * MiB },
    },
    dir,
  );
  // A well-behaved client stays connected through every case below.
  const bystander = await RawClient.open(srv.socketPath);
  await bystander.go('rw');

  for (const [i, c] of CASES.entries()) {
    await t.test(c.name, async () => {
      const client = await RawClient.open(srv.socketPath);
      try {
        await c.run(client);
      } finally {
        client.destroy();
      }
      await readWorksStructured(bystander, BigInt(1000 + i));
    });
  }
  assert.ok(!bystander.isClosed);
  const info = JSON.parse(await runOk('nbdinfo', ['--json', `nbd+unix:///rw?socket=${srv.socketPath}`]));
  assert.equal(info.exports[0]['export-size'], 4 * MiB);
  // Every broken connection was logged, none took the server down, and all are gone.
  assert.ok(srv.log.lines.some((l) => /bad request magic/.test(l)), srv.log.lines.join('\n'));
  assert.ok(srv.log.lines.some((l) => /handshake not finished/.test(l)));
  assert.ok(srv.log.lines.some((l) => /has not read its replies/.test(l)));
  bystander.destroy();
  await waitFor(() => srv.server.connectionCount === 0, 5000, 'every connection to close');
});

test('random garbage in either phase closes or answers, never takes the server down', async (t) => {
  const dir = tempDir(t);
  const rw = join(dir, 'rw.raw');
  writeFileSync(rw, Buffer.alloc(MiB, 0x42));
  const srv = await startServer(
    t,
    { exports: [{ name: 'rw', device: await openRawDevice(t, rw), readOnly: false }], limits: { handshakeTimeoutMs: HANDSHAKE_TIMEOUT_MS } },
    dir,
  );
  const bystander = await RawClient.open(srv.socketPath);
  await bystander.go('rw');
  await fc.assert(
    fc.asyncProperty(fc.boolean(), fc.uint8Array({ minLength: 1, maxLength: 200 }), async (transmission, garbage) => {
      const c = await RawClient.open(srv.socketPath);
      try {
        if (transmission) await c.go('rw');
        else await c.greet();
        c.write(Buffer.from(garbage));
        // Whatever the bytes meant, the connection either stays usable or is closed; the
        // server as a whole keeps answering.
        await new Promise((r) => setTimeout(r, 5));
      } finally {
        c.destroy();
      }
      await readWorksStructured(bystander, 7n);
    }),
    { numRuns: 60 },
  );
  await waitFor(() => srv.server.connectionCount === 1, 5000, 'garbage connections to close');
  bystander.destroy();
});
