// Connections served on other threads (server/lanes.ts): the handshake on the main thread, the
// requests on a lane, the image seen alike through both; the main thread still counts the
// lane's connections (--shared), closes them on shutdown and logs for them.

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { offsetFilter } from '../../src/block/filters/offset.js';
import { NbdClient } from '../../src/client/index.js';
import { openRaw } from '../../src/formats/raw/driver.js';
import type { RawReopen } from '../../src/cli/serve-lane.js';
import { repoRoot, requirePeers, run, runOk, tempDir, waitFor } from '../helpers/peers.js';
import { startServer, type TestServer } from '../helpers/server.js';

const MiB = 1024 * 1024;
/** The lanes' script `imgbd serve` uses, built beside this test. */
const ENTRY = new URL('../../src/cli/serve-lane.js', import.meta.url);

async function laneServer(t: TestContext, img: string, opts: { window?: { offsetBytes: number; sizeBytes: number }; maxConnections?: number } = {}): Promise<TestServer> {
  const raw = await openRaw(img);
  t.after(() => raw.close());
  const reopen: RawReopen = { fd: raw.descriptor, readOnly: false, probedRaw: false, ...(opts.window && { window: opts.window }) };
  const device = opts.window ? offsetFilter(raw, opts.window) : raw;
  const srv = await startServer(t, {
    exports: [{ name: '', device, readOnly: false, reopen }],
    lanes: { entry: ENTRY, threads: 1 },
    ...(opts.maxConnections !== undefined && { maxConnections: opts.maxConnections }),
  });
  await waitFor(() => srv.log.lines.some((l) => /thread 1 ready/.test(l)), 20_000, 'the lane to start');
  return srv;
}

function servedOnLane(srv: TestServer): number {
  return srv.log.lines.filter((l) => /served on thread 1/.test(l)).length;
}

test('lanes: a second client is served on another thread and sees what the first wrote, and the reverse', async (t) => {
  const dir = tempDir(t);
  const img = join(dir, 'disk.raw');
  const start = randomBytes(8 * MiB);
  writeFileSync(img, start);
  const srv = await laneServer(t, img);
  const a = await NbdClient.connect(srv.uri);
  t.after(() => a.disconnect().catch(() => {}));
  const b = await NbdClient.connect(srv.uri);
  t.after(() => b.disconnect().catch(() => {}));
  // The first client stays on the main thread, the second goes to the idle lane.
  await waitFor(() => servedOnLane(srv) === 1, 5000, 'a connection to move');
  assert.ok(srv.log.lines.some((l) => /connection \d+: served on thread 1/.test(l)));
  assert.equal(srv.server.connectionCount, 2);

  const x = randomBytes(MiB + 4096);
  await b.pwrite(x, MiB);
  const seen = Buffer.alloc(x.length);
  await a.pread(seen, MiB);
  assert.ok(seen.equals(x), 'the main thread reads what the lane wrote');
  const y = randomBytes(300_000);
  await a.pwrite(y, 5 * MiB + 7);
  const seenB = Buffer.alloc(y.length);
  await b.pread(seenB, 5 * MiB + 7);
  assert.ok(seenB.equals(y), 'the lane reads what the main thread wrote');
  await b.zero(3 * MiB, 64 * 1024, { fua: true });
  await b.trim(6 * MiB + 512 * 1024, 256 * 1024);
  await b.flush();
  // The lane answers block status with the contexts the main thread negotiated.
  const status = (await b.blockStatus(6 * MiB, MiB)).get('base:allocation') ?? [];
  assert.ok(status.length > 0, 'base:allocation was negotiated before the move');
  const tail = Buffer.alloc(4096);
  await b.pread(tail, 8 * MiB - 4096);
  assert.ok(tail.equals(start.subarray(8 * MiB - 4096)));

  const expected = Buffer.from(start);
  x.copy(expected, MiB);
  y.copy(expected, 5 * MiB + 7);
  expected.fill(0, 3 * MiB, 3 * MiB + 64 * 1024);
  expected.fill(0, 6 * MiB + 512 * 1024, 6 * MiB + 768 * 1024);
  assert.ok(readFileSync(img).equals(expected), 'the file holds every write, whichever thread made it');

  await b.disconnect();
  await waitFor(() => srv.server.connectionCount === 1, 5000, 'the lane connection to be counted closed');

  // Shutting down while a write's payload is half here on the lane: the write completes and is
  // answered, then the connection closes, then close() resolves.
  const c = await rawTransmissionClient(srv.socketPath);
  await waitFor(() => servedOnLane(srv) === 2, 5000, 'the raw client to move');
  const replies: Buffer[] = [];
  c.on('data', (d: Buffer) => replies.push(d));
  const last = randomBytes(MiB);
  const header = Buffer.alloc(28);
  header.writeUInt32BE(0x25609513, 0);
  header.writeUInt16BE(1, 6); // NBD_CMD_WRITE
  header.writeBigUInt64BE(9n, 8);
  header.writeBigUInt64BE(0n, 16);
  header.writeUInt32BE(last.length, 24);
  c.write(Buffer.concat([header, last.subarray(0, last.length / 2)]));
  await new Promise((r) => setTimeout(r, 200));
  let closed = false;
  const closing = srv.server.close().then(() => (closed = true));
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(closed, false, 'close() waits for the write in flight');
  c.write(last.subarray(last.length / 2));
  await closing;
  await waitFor(() => c.destroyed || c.readableEnded, 5000, 'the connection to close');
  const r = Buffer.concat(replies);
  assert.equal(r.length, 16, 'one reply, then the end');
  assert.equal(r.readUInt32BE(4), 0, 'the write succeeded');
  assert.equal(r.readBigUInt64BE(8), 9n);
  assert.equal(srv.server.connectionCount, 0);
  assert.ok(readFileSync(img).subarray(0, last.length).equals(last), 'the write is in the file');
});

test('lanes: requests sent with the handshake reach the lane; --offset/--size apply there too', async (t) => {
  const dir = tempDir(t);
  const img = join(dir, 'disk.raw');
  const start = randomBytes(4 * MiB);
  writeFileSync(img, start);
  const window = { offsetBytes: MiB, sizeBytes: 2 * MiB };
  const srv = await laneServer(t, img, { window });
  const a = await NbdClient.connect(srv.uri);
  t.after(() => a.disconnect().catch(() => {}));

  // NBD_OPT_EXPORT_NAME and a READ in one write: the read is already buffered on the main
  // thread when the connection moves, and must be served by the lane all the same.
  const s = connect(srv.socketPath);
  t.after(() => s.destroy());
  await once(s, 'connect');
  const got: Buffer[] = [];
  s.on('data', (d: Buffer) => got.push(d));
  await waitFor(() => Buffer.concat(got).length >= 18, 5000, 'the greeting');
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(3); // FIXED_NEWSTYLE | NO_ZEROES
  const opt = Buffer.alloc(16);
  Buffer.from('IHAVEOPT').copy(opt, 0);
  opt.writeUInt32BE(1, 8); // NBD_OPT_EXPORT_NAME, empty name
  const read = Buffer.alloc(28);
  read.writeUInt32BE(0x25609513, 0);
  read.writeUInt16BE(0, 6); // NBD_CMD_READ
  read.writeBigUInt64BE(7n, 8);
  read.writeBigUInt64BE(4096n, 16);
  read.writeUInt32BE(8192, 24);
  s.write(Buffer.concat([flags, opt, read]));
  const want = 18 + 10 + 16 + 8192;
  await waitFor(() => Buffer.concat(got).length >= want, 10_000, 'export info and the read reply');
  const r = Buffer.concat(got).subarray(18);
  assert.equal(Number(r.readBigUInt64BE(0)), 2 * MiB, 'the window size');
  assert.equal(r.readUInt32BE(10), 0x67446698);
  assert.equal(r.readUInt32BE(14), 0, 'no error');
  assert.equal(r.readBigUInt64BE(18), 7n);
  assert.ok(r.subarray(26, 26 + 8192).equals(start.subarray(MiB + 4096, MiB + 4096 + 8192)), 'read through the window');
  assert.equal(servedOnLane(srv), 1);

  // A write past the window is refused on the lane; one inside lands at the window's offset.
  const b = await NbdClient.connect(srv.uri);
  t.after(() => b.disconnect().catch(() => {}));
  const z = randomBytes(65536);
  await b.pwrite(z, 2 * MiB - z.length);
  await assert.rejects(b.pwrite(z, 2 * MiB - 4096));
  assert.ok(readFileSync(img).subarray(3 * MiB - z.length, 3 * MiB).equals(z));
});

test('lanes: --shared counts the connections a lane serves; a broken one is logged and the rest carry on', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  const dir = tempDir(t);
  const img = join(dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(MiB, 0x5a));
  const srv = await laneServer(t, img, { maxConnections: 2 });
  const a = await NbdClient.connect(srv.uri);
  t.after(() => a.disconnect().catch(() => {}));
  const b = await NbdClient.connect(srv.uri);
  t.after(() => b.disconnect().catch(() => {}));
  await waitFor(() => servedOnLane(srv) === 1, 5000, 'b to move');
  const refused = await run('nbdinfo', ['--size', srv.uri]);
  assert.notEqual(refused.code, 0, 'a third client is over the limit');
  assert.ok(srv.log.lines.some((l) => /refusing a client/.test(l)));
  await b.disconnect();
  await waitFor(() => srv.server.connectionCount === 1, 5000, 'the lane connection to close');
  assert.equal((await runOk('nbdinfo', ['--size', srv.uri])).trim(), String(MiB));

  // Garbage on a lane connection: that connection goes, with a line in the server's log.
  await waitFor(() => srv.server.connectionCount === 1, 5000, 'nbdinfo to leave');
  const bad = await rawTransmissionClient(srv.socketPath);
  bad.write(Buffer.alloc(28, 0xff));
  await once(bad, 'close');
  assert.equal(servedOnLane(srv), 3, 'nbdinfo and the broken client were served on the lane');
  await waitFor(() => srv.log.lines.some((l) => /^warn: thread 1: connection \d+ .*magic/i.test(l)), 5000, 'the lane to report the bad request');
  const buf = Buffer.alloc(512);
  await a.pread(buf, 0);
  assert.ok(buf.every((v) => v === 0x5a));
});

/** A client past NBD_OPT_EXPORT_NAME, its socket left for the test to write to. */
async function rawTransmissionClient(path: string): Promise<Socket> {
  const s = connect(path);
  await once(s, 'connect');
  s.on('error', () => {});
  let n = 0;
  const count = (d: Buffer): void => {
    n += d.length;
  };
  s.on('data', count);
  await waitFor(() => n >= 18, 5000, 'the greeting');
  const hello = Buffer.alloc(20);
  hello.writeUInt32BE(3, 0);
  Buffer.from('IHAVEOPT').copy(hello, 4);
  hello.writeUInt32BE(1, 12);
  s.write(hello);
  await waitFor(() => n >= 28, 5000, 'the export info');
  s.off('data', count);
  return s;
}

test('imgbd serve: nbdcopy over four connections on two threads writes and reads back the image; SIGTERM exits 0', async (t) => {
  if (!requirePeers(t, 'nbdcopy')) return;
  const dir = tempDir(t);
  const img = join(dir, 'disk.raw');
  const src = join(dir, 'src.raw');
  writeFileSync(img, Buffer.alloc(32 * MiB));
  const data = randomBytes(32 * MiB);
  writeFileSync(src, data);
  const sock = join(dir, 'nbd.sock');
  const child = spawn(process.execPath, [join(repoRoot(), 'dist/src/cli/main.js'), 'serve', '-v', '-f', 'raw', '-k', sock, '-e', '0', '-t', '--threads', '2', img], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  await waitFor(() => existsSync(sock) && /thread 1 ready/.test(err), 20_000, 'the server and its second thread');
  const uri = `nbd+unix:///?socket=${sock}`;
  await runOk('nbdcopy', ['--connections=4', src, uri]);
  assert.ok(/served on thread 1/.test(err), 'some connections went to the second thread');
  assert.ok(readFileSync(img).equals(data), 'the image holds the copy');
  const back = join(dir, 'back.raw');
  await runOk('nbdcopy', ['--connections=4', uri, back]);
  assert.ok(readFileSync(back).equals(data));
  child.kill('SIGTERM');
  const [code] = (await once(child, 'exit')) as [number | null];
  assert.equal(code, 0, err);
  assert.equal(existsSync(sock), false);
});
