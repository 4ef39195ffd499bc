// Large writes spliced from the socket into a raw file (server/spliced-write.ts), driven over a
// real socketpair as the kernel's NBD client drives it: payloads that arrive in pieces, FUA,
// small writes and reads in between, a client that goes away mid-payload, and a file that
// refuses the bytes.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, openSync, readFileSync, readSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { openRaw } from '../../src/formats/raw/driver.js';
import { NbdServer } from '../../src/server/server.js';
import { SplicedWrite } from '../../src/server/spliced-write.js';
import { closeFd, socketPair } from '../../src/sys/socket.js';
import { splicePipe, spliceStats } from '../../src/sys/splice.js';

const NBD_CMD_READ = 0;
const NBD_CMD_WRITE = 1;
const NBD_CMD_FLAG_FUA = 1;

/** A request header from the wire layout: magic, flags, type, cookie, offset, length (big-endian). */
function request(type: number, cookie: number, offset: number, length: number, flags = 0): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(0x25609513, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(BigInt(cookie), 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeUInt32BE(length, 24);
  return b;
}

interface ReplyReader {
  /** The next simple reply header (16 bytes). */
  (): Promise<{ error: number; cookie: number; data: Buffer }>;
  /** The data of a read, after its header. */
  data(n: number): Promise<Buffer>;
}

/** Simple replies as they arrive on `socket`. */
function replyReader(socket: Socket): ReplyReader {
  let buffered = Buffer.alloc(0);
  let wake: (() => void) | null = null;
  socket.on('data', (c: Buffer) => {
    buffered = Buffer.concat([buffered, c]);
    wake?.();
  });
  const take = async (n: number): Promise<Buffer> => {
    while (buffered.length < n) await new Promise<void>((resolve) => (wake = resolve));
    const out = buffered.subarray(0, n);
    buffered = buffered.subarray(n);
    return out;
  };
  const header = async (): Promise<{ error: number; cookie: number; data: Buffer }> => {
    const h = await take(16);
    assert.equal(h.readUInt32BE(0), 0x67446698, 'simple reply magic');
    return { error: h.readUInt32BE(4), cookie: Number(h.readBigUInt64BE(8)), data: Buffer.alloc(0) };
  };
  return Object.assign(header, { data: take });
}

async function serveImage(
  t: { after: (fn: () => void | Promise<void>) => void },
  sizeBytes: number,
  pollMaxUs = 0,
): Promise<{ path: string; client: Socket; served: Promise<void>; server: NbdServer }> {
  const dir = mkdtempSync(join(tmpdir(), 'imgbd-splice-'));
  const path = join(dir, 'disk.raw');
  writeFileSync(path, '');
  truncateSync(path, sizeBytes);
  const server = new NbdServer({ exports: [{ name: '', device: await openRaw(path), readOnly: false }], pollMaxUs });
  const [serverFd, clientFd] = socketPair();
  const served = server.serveTransmission(serverFd, '');
  const client = new Socket({ fd: clientFd, readable: true, writable: true });
  t.after(async () => {
    client.destroy();
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { path, client, served, server };
}

test('large writes go to the file through the pipe, in pieces, between small writes and reads', async (t) => {
  const size = 4 << 20;
  const { path, client } = await serveImage(t, size);
  const reply = replyReader(client);
  const expected = Buffer.alloc(size);
  const a = randomBytes(1 << 20);
  const b = randomBytes(64 << 10);
  const c = randomBytes(4096);
  const d = randomBytes(200 << 10);
  a.copy(expected, 0);
  b.copy(expected, (1 << 20) + 512);
  c.copy(expected, 2 << 20);
  d.copy(expected, 3 << 20);
  const before = spliceStats.bytesToFile;

  // A: its payload trickles in, so the server waits for it twice.
  client.write(Buffer.concat([request(NBD_CMD_WRITE, 1, 0, a.length), a.subarray(0, 1000)]));
  await sleep(30);
  client.write(a.subarray(1000, 301_000));
  await sleep(30);
  client.write(a.subarray(301_000));
  // B: FUA, unaligned, with its header. C: small (read into memory). D: a small read right behind it.
  client.write(Buffer.concat([request(NBD_CMD_WRITE, 2, (1 << 20) + 512, b.length, NBD_CMD_FLAG_FUA), b]));
  client.write(Buffer.concat([request(NBD_CMD_WRITE, 3, 2 << 20, c.length), c]));
  client.write(Buffer.concat([request(NBD_CMD_WRITE, 4, 3 << 20, d.length), d, request(NBD_CMD_READ, 5, (5 << 19) + 4096, 4096)]));

  // Replies may come in any order ("the server MAY send replies out of order"): the read comes with its data.
  const cookies: number[] = [];
  for (let i = 0; i < 5; i++) {
    const r = await reply();
    assert.equal(r.error, 0);
    cookies.push(r.cookie);
    if (r.cookie === 5) assert.ok((await reply.data(4096)).equals(Buffer.alloc(4096)));
  }
  assert.deepEqual(cookies.sort(), [1, 2, 3, 4, 5]);
  client.write(request(NBD_CMD_READ, 6, 0, size));
  const read = await reply();
  assert.equal(read.error, 0);
  assert.equal(read.cookie, 6);
  read.data = await reply.data(size);
  assert.ok(read.data.equals(expected), 'the read sees every write');
  assert.ok(readFileSync(path).equals(expected), 'the file holds every write');
  assert.equal(spliceStats.bytesToFile - before, a.length + b.length + d.length, 'the three large payloads went through the pipe');
});

test('a payload still on its way leaves only the client to wait for: the idle poller watches its socket', async (t) => {
  const { path, client, server } = await serveImage(t, 2 << 20, 1000);
  const reply = replyReader(client);
  const a = randomBytes(1 << 20);
  client.write(Buffer.concat([request(NBD_CMD_WRITE, 1, 0, a.length), a.subarray(0, 1000)]));
  // The server takes the 1000 bytes, finds the socket empty and polls it (one 1 ms budget: the
  // rest comes later), then sleeps.
  await sleep(50);
  assert.deepEqual(server.pollCounts, { polls: 1, found: 0 });
  client.write(a.subarray(1000));
  const r = await reply();
  assert.deepEqual([r.error, r.cookie], [0, 1]);
  assert.ok(readFileSync(path).subarray(0, a.length).equals(a));
});

test('a client gone in the middle of a payload closes the connection, without a reply', async (t) => {
  const { path, client, served } = await serveImage(t, 2 << 20);
  let replies = 0;
  client.on('data', () => replies++);
  client.write(Buffer.concat([request(NBD_CMD_WRITE, 1, 0, 1 << 20), Buffer.alloc(100_000, 0xab)]));
  await sleep(30);
  client.end();
  const outcome = await Promise.race([served.then(() => 'closed'), sleep(5000).then(() => 'hung')]);
  assert.equal(outcome, 'closed');
  assert.equal(replies, 0);
  // What came may have been written (the write was never acknowledged); nothing past it was.
  assert.ok(readFileSync(path).subarray(100_000).equals(Buffer.alloc((2 << 20) - 100_000)));
  assert.equal(splicePipe()!.bytesHeld, 0, 'the shared pipe is left empty');
});

test('a file that refuses the payload fails the write, and the stream stays in step', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'imgbd-splice-'));
  const path = join(dir, 'ro.raw');
  writeFileSync(path, Buffer.alloc(256 << 10));
  const readOnlyFd = openSync(path, 'r');
  const [serverFd, clientFd] = socketPair();
  t.after(() => {
    for (const fd of [readOnlyFd, serverFd, clientFd]) closeFd(fd);
    rmSync(dir, { recursive: true, force: true });
  });
  const payload = randomBytes(128 << 10);
  writeSync(clientFd, Buffer.concat([payload, Buffer.from('NEXT')]));
  const w = new SplicedWrite(1n, payload.length, false, splicePipe()!, { fd: readOnlyFd, offset: 0, length: payload.length });
  w.take(Buffer.alloc(0));
  assert.equal(w.advance(serverFd), 'done');
  assert.equal((w.error as { code?: string }).code, 'EBADF');
  const next = Buffer.alloc(4);
  assert.equal(readSync(serverFd, next), 4);
  assert.equal(next.toString(), 'NEXT', 'the payload was taken off the socket all the same');
  assert.ok(readFileSync(path).equals(Buffer.alloc(256 << 10)), 'the file is untouched');
  assert.equal(splicePipe()!.bytesHeld, 0);
});
