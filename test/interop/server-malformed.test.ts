// Malformed and hostile clients over a raw unix socket: each case gets its own connection and
// expects a precise reply or a disconnect; the server must keep serving good clients
// throughout (checked with nbdinfo and a raw client afterwards). Messages are built by hand
// here, not with the codec under test.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requirePeers, runOk, tempDir, waitFor } from '../helpers/peers.js';
import { openRawDevice, startServer } from '../helpers/server.js';

const MiB = 1024 * 1024;
const IHAVEOPT = Buffer.from('IHAVEOPT');
const REQUEST_MAGIC = 0x25609513;
const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8, LIST_META: 9, SET_META: 10, EXTENDED_HEADERS: 11 };
const REP = { ACK: 1, SERVER: 2, INFO: 3, META: 4, ERR_UNSUP: 0x80000001, ERR_POLICY: 0x80000002, ERR_INVALID: 0x80000003, ERR_UNKNOWN: 0x80000006, ERR_TOO_BIG: 0x80000009 };
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 };
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const HANDSHAKE_TIMEOUT_MS = 400;
const STALL_TIMEOUT_MS = 400;

class RawClient {
  private readonly sock: Socket;
  private buf = Buffer.alloc(0);
  private ended = false;
  private wake: (() => void) | undefined;

  private constructor(sock: Socket) {
    this.sock = sock;
    sock.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake?.();
    });
    const end = (): void => {
      this.ended = true;
      this.wake?.();
    };
    sock.on('end', end);
    sock.on('close', end);
    sock.on('error', end);
  }

  static open(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  get isClosed(): boolean {
    return this.ended;
  }

  write(b: Buffer): void {
    if (!this.sock.destroyed) this.sock.write(b);
  }

  pause(): void {
    this.sock.pause();
  }

  resume(): void {
    this.sock.resume();
  }

  destroy(): void {
    this.sock.destroy();
  }

  private async waitUntil(ok: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!ok()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = undefined;
    }
  }

  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    await this.waitUntil(() => this.buf.length >= n || this.ended, timeoutMs, `${n} bytes`);
    if (this.buf.length < n) throw new Error(`connection closed with ${this.buf.length} of ${n} bytes`);
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Resolves when the server has closed the connection (whatever was still unread is dropped). */
  async expectClosed(timeoutMs = 5000): Promise<void> {
    await this.waitUntil(() => this.ended, timeoutMs, 'the server to close the connection');
  }

  // ---- handshake ----

  async greet(clientFlags = 3): Promise<void> {
    const g = await this.read(18);
    assert.equal(g.subarray(0, 8).toString(), 'NBDMAGIC');
    assert.ok(g.subarray(8, 16).equals(IHAVEOPT));
    assert.equal(g.readUInt16BE(16), 3); // FIXED_NEWSTYLE | NO_ZEROES
    const f = Buffer.alloc(4);
    f.writeUInt32BE(clientFlags);
    this.write(f);
  }

  option(opt: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
    const h = Buffer.alloc(16);
    IHAVEOPT.copy(h);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(declaredLength, 12);
    this.write(Buffer.concat([h, data]));
  }

  async optReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    assert.equal(h.readBigUInt64BE(0), 0x3e889045565a9n);
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }

  /** Read option replies up to the final ACK or error; returns all of them. */
  async optReplies(): Promise<{ option: number; type: number; data: Buffer }[]> {
    const out = [];
    for (;;) {
      const r = await this.optReply();
      out.push(r);
      if (r.type === REP.ACK || r.type >= 0x80000000) return out;
    }
  }

  async expectOptError(opt: number, type: number): Promise<void> {
    const replies = await this.optReplies();
    const last = replies[replies.length - 1]!;
    assert.equal(last.option, opt);
    assert.equal(last.type >>> 0, type, `reply 0x${last.type.toString(16)}: ${last.data.toString()}`);
  }

  /** Optionally negotiate structured replies and base:allocation, then NBD_OPT_GO. */
  async go(name: string, opts: { structured?: boolean; meta?: boolean } = {}): Promise<void> {
    await this.greet();
    if (opts.structured ?? true) {
      this.option(OPT.STRUCTURED_REPLY);
      assert.equal((await this.optReply()).type, REP.ACK);
    }
    if (opts.meta) {
      this.option(OPT.SET_META, metaRequest(name, ['base:allocation']));
      assert.deepEqual((await this.optReplies()).map((r) => r.type), [REP.META, REP.ACK]);
    }
    this.option(OPT.GO, infoRequest(name, [3]));
    const replies = await this.optReplies();
    assert.equal(replies[replies.length - 1]!.type, REP.ACK, replies.map((r) => r.data.toString()).join());
  }

  // ---- transmission ----

  request(type: number, flags: number, cookie: bigint, offset: bigint, length: number, payload?: Buffer): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(offset, 16);
    h.writeUInt32BE(length, 24);
    this.write(payload ? Buffer.concat([h, payload]) : h);
  }

  async simpleReply(): Promise<{ error: number; cookie: bigint }> {
    const h = await this.read(16);
    assert.equal(h.readUInt32BE(0), 0x67446698);
    return { error: h.readUInt32BE(4), cookie: h.readBigUInt64BE(8) };
  }

  async chunk(): Promise<{ flags: number; type: number; cookie: bigint; payload: Buffer }> {
    const h = await this.read(20);
    assert.equal(h.readUInt32BE(0), 0x668e33ef);
    return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), payload: await this.read(h.readUInt32BE(16)) };
  }

  /** A structured error chunk: returns the errno. */
  async errorChunk(cookie: bigint): Promise<number> {
    const c = await this.chunk();
    assert.equal(c.cookie, cookie);
    assert.equal(c.type, 0x8001, `chunk type ${c.type}`);
    assert.equal(c.flags & 1, 1);
    return c.payload.readUInt32BE(0);
  }
}

function infoRequest(name: string, infos: number[], nameLenOverride?: number): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(nameLenOverride ?? n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((x, i) => b.writeUInt16BE(x, 6 + n.length + 2 * i));
  return b;
}

function metaRequest(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const u32 = (v: number): Buffer => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v);
    return b;
  };
  const n = Buffer.from(name);
  parts.push(u32(n.length), n, u32(queries.length));
  for (const q of queries) parts.push(u32(Buffer.byteLength(q)), Buffer.from(q));
  return Buffer.concat(parts);
}

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
