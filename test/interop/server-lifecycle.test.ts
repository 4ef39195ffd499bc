// Server lifecycle: --shared limits, --persistent / idle, graceful close with requests in
// flight and a stalled handshake, the listeners (unix mode 0600, stale and live socket
// files, TCP, systemd-inherited fds) and serveTransmission for a handshake-less client.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, statSync, writeFileSync, readFileSync } from 'node:fs';
import { connect, createServer, Socket as NetSocket, type Server, type Socket } from 'node:net';
import { randomBytes } from 'node:crypto';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { BlockDevice } from '../../src/block/device.js';
import { listenInherited, listenTcp, listenUnix } from '../../src/server/listen.js';
import { NbdServer } from '../../src/server/server.js';
import { socketPair } from '../../src/sys/socket.js';
import { requirePeers, run, runOk, tempDir, waitFor } from '../helpers/peers.js';
import { openRawDevice, recordingLogger, startServer } from '../helpers/server.js';

const MiB = 1024 * 1024;

function connectUnix(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect(path);
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

/** Collects everything a socket receives and whether it closed. */
function watch(s: Socket): { bytes: () => Buffer; closed: Promise<void> } {
  const chunks: Buffer[] = [];
  s.on('data', (d: Buffer) => chunks.push(d));
  s.on('error', () => {});
  return { bytes: () => Buffer.concat(chunks), closed: once(s, 'close').then(() => undefined) };
}

function request(type: number, cookie: number, offset: number, length: number): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(0x25609513, 0);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(BigInt(cookie), 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeUInt32BE(length, 24);
  return b;
}

async function rawFile(dir: string, name: string, bytes: Buffer): Promise<string> {
  const p = join(dir, name);
  writeFileSync(p, bytes);
  return p;
}

test('maxConnections refuses extra clients while the limit is reached', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  const dir = tempDir(t);
  const img = await rawFile(dir, 'a.raw', Buffer.alloc(MiB));
  const srv = await startServer(t, { exports: [{ name: '', device: await openRawDevice(t, img, true), readOnly: true }], maxConnections: 1 }, dir);
  const first = await connectUnix(srv.socketPath);
  const w1 = watch(first);
  await waitFor(() => w1.bytes().length >= 18, 5000, 'greeting');
  const refused = await run('nbdinfo', ['--json', srv.uri]);
  assert.notEqual(refused.code, 0);
  assert.ok(srv.log.lines.some((l) => /refusing a client/.test(l)));
  first.destroy();
  await waitFor(() => srv.server.connectionCount === 0, 5000, 'first client to go');
  const ok = JSON.parse(await runOk('nbdinfo', ['--json', srv.uri]));
  assert.equal(ok.exports[0]['export-size'], MiB);
});

test('without persistent, the server closes after its last client; idle is emitted', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  const dir = tempDir(t);
  const img = await rawFile(dir, 'a.raw', Buffer.alloc(MiB));
  const srv = await startServer(t, { exports: [{ name: '', device: await openRawDevice(t, img, true), readOnly: true }], persistent: false }, dir);
  const idle = once(srv.server, 'idle');
  const closed = once(srv.server, 'close');
  await runOk('nbdinfo', ['--json', srv.uri]);
  await idle;
  await closed;
  const again = await run('nbdinfo', ['--json', srv.uri]);
  assert.notEqual(again.code, 0, 'the listener should be gone');
});

test('close() finishes in-flight writes, flushes, and is not held up by a stalled handshake', async (t) => {
  const dir = tempDir(t);
  const img = await rawFile(dir, 'a.raw', Buffer.alloc(MiB));
  const raw = await openRawDevice(t, img);
  let flushes = 0;
  let releaseWrite: (() => void) | undefined;
  let writeStartedResolve!: () => void;
  const writeStarted = new Promise<void>((resolve) => (writeStartedResolve = resolve));
  // A device whose writes wait until the test lets them go (none written here and now), and
  // which counts flushes.
  const slow: BlockDevice = Object.assign(Object.create(raw) as BlockDevice, {
    writeNow: undefined,
    pwrite: async (buf: Buffer, off: number) => {
      writeStartedResolve();
      await new Promise<void>((r) => (releaseWrite = r));
      await raw.pwrite!(buf, off);
    },
    flush: async () => {
      flushes++;
      await raw.flush!();
    },
  });
  const log = recordingLogger();
  // A long handshake timeout: close() must not wait for it.
  const server = new NbdServer({ exports: [{ name: '', device: slow, readOnly: false }], logger: log, limits: { handshakeTimeoutMs: 60_000 } });
  t.after(() => server.close());
  const path = join(dir, 's.sock');
  await listenUnix(server, path);

  const staller = await connectUnix(path);
  const ws = watch(staller);
  const client = await connectUnix(path);
  const wc = watch(client);
  // Handshake by hand: client flags, NBD_OPT_EXPORT_NAME "" (no zeroes).
  await waitFor(() => wc.bytes().length >= 18, 5000, 'greeting');
  const opt = Buffer.alloc(20);
  opt.writeUInt32BE(3, 0);
  opt.write('IHAVEOPT', 4, 'latin1');
  opt.writeUInt32BE(1, 12);
  opt.writeUInt32BE(0, 16);
  client.write(opt);
  await waitFor(() => wc.bytes().length >= 18 + 10, 5000, 'export reply');
  const payload = Buffer.alloc(4096, 0x99);
  client.write(Buffer.concat([request(1, 7, 8192, 4096), payload]));
  await writeStarted;

  const closing = server.close();
  assert.equal(flushes, 0);
  releaseWrite!();
  await closing;
  // The write was answered (simple reply, no error, cookie 7) before the connection went.
  await wc.closed;
  const reply = wc.bytes().subarray(28);
  assert.equal(reply.length, 16);
  assert.equal(reply.readUInt32BE(4), 0);
  assert.equal(reply.readBigUInt64BE(8), 7n);
  assert.ok(readFileSync(img).subarray(8192, 8192 + 4096).equals(payload));
  assert.ok(flushes >= 1, 'exports are flushed on close');
  await ws.closed;
});

test('listenUnix: mode 0600, a stale socket file is replaced, a live one or a regular file is refused', async (t) => {
  if (!requirePeers(t, 'python3', 'nbdinfo')) return;
  const dir = tempDir(t);
  const img = await rawFile(dir, 'a.raw', Buffer.alloc(MiB));
  const dev = await openRawDevice(t, img, true);
  const server = new NbdServer({ exports: [{ name: '', device: dev, readOnly: true }] });
  t.after(() => server.close());

  // A socket file with nothing listening, as a crashed server leaves it.
  const stale = join(dir, 'stale.sock');
  await runOk('python3', ['-c', `import socket; s=socket.socket(socket.AF_UNIX); s.bind(${JSON.stringify(stale)})`]);
  assert.ok(statSync(stale).isSocket());
  const l = await listenUnix(server, stale);
  assert.equal(statSync(stale).mode & 0o777, 0o600);
  assert.equal(JSON.parse(await runOk('nbdinfo', ['--json', `nbd+unix:///?socket=${stale}`])).exports[0]['export-size'], MiB);

  // The same path again: it is alive now.
  await assert.rejects(listenUnix(server, stale), (e: Error & { code?: string }) => e.code === 'ERR_LISTEN' && /in use/.test(e.message));
  const regular = join(dir, 'plain');
  writeFileSync(regular, 'x');
  await assert.rejects(listenUnix(server, regular), (e: Error & { code?: string }) => e.code === 'ERR_LISTEN');
  assert.equal(readFileSync(regular, 'utf8'), 'x');
  await l.close();
});

test('listenTcp on 127.0.0.1 with an ephemeral port', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  const dir = tempDir(t);
  const img = await rawFile(dir, 'a.raw', Buffer.alloc(2 * MiB));
  const server = new NbdServer({ exports: [{ name: 'x', device: await openRawDevice(t, img, true), readOnly: true }] });
  t.after(() => server.close());
  const l = await listenTcp(server, { port: 0 });
  assert.match(l.address, /^127\.0\.0\.1:\d+$/);
  const info = JSON.parse(await runOk('nbdinfo', ['--json', `nbd://127.0.0.1:${l.port}/x`]));
  assert.equal(info.exports[0]['export-size'], 2 * MiB);
});

test('listenInherited serves a socket passed as fd 3 with LISTEN_FDS/LISTEN_PID', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  const dir = tempDir(t);
  const img = await rawFile(dir, 'a.raw', Buffer.alloc(3 * MiB));
  const script = join(dir, 'child.mts');
  // The repository root (this file may run from test/ or from the compiled dist/test/).
  let root = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(root, 'package.json'))) root = dirname(root);
  writeFileSync(
    script,
    `import { openRaw } from ${JSON.stringify(join(root, 'src/formats/raw/driver.ts'))};
import { NbdServer } from ${JSON.stringify(join(root, 'src/server/server.ts'))};
import { listenInherited } from ${JSON.stringify(join(root, 'src/server/listen.ts'))};
// systemd sets LISTEN_PID to the service's pid after fork; this stands in for it.
process.env.LISTEN_PID = String(process.pid);
const dev = await openRaw(${JSON.stringify(img)}, { readOnly: true });
const s = new NbdServer({ exports: [{ name: '', device: dev, readOnly: true }] });
const ls = await listenInherited(s);
console.log('listening ' + ls.map((l) => l.address).join(',') + ' ' + process.env.LISTEN_FDS);
`,
  );
  const listener: Server = createServer();
  await new Promise<void>((r) => listener.listen({ host: '127.0.0.1', port: 0 }, r));
  const port = (listener.address() as { port: number }).port;
  const fd = (listener as unknown as { _handle: { fd: number } })._handle.fd;
  const child = spawn(process.execPath, ['--import', 'tsx', script], {
    cwd: root,
    stdio: ['ignore', 'pipe', 'pipe', fd],
    env: { ...process.env, LISTEN_FDS: '1' },
  });
  t.after(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  await waitFor(() => /listening/.test(out) || child.exitCode !== null, 20_000, 'the child to listen');
  // The variables are consumed, so grandchildren would not inherit them.
  assert.match(out, /listening fd:3 undefined/);
  // Our copy of the socket stops accepting; the child's keeps the port.
  listener.close();
  const info = JSON.parse(await runOk('nbdinfo', ['--json', `nbd://127.0.0.1:${port}`]));
  assert.equal(info.exports[0]['export-size'], 3 * MiB);
});

test('listenInherited ignores sockets meant for another process', async (t) => {
  const dir = tempDir(t);
  const img = await rawFile(dir, 'a.raw', Buffer.alloc(4096));
  const server = new NbdServer({ exports: [{ name: '', device: await openRawDevice(t, img, true), readOnly: true }] });
  t.after(() => server.close());
  const env: NodeJS.ProcessEnv = { LISTEN_PID: String(process.pid + 1), LISTEN_FDS: '1' };
  assert.deepEqual(await listenInherited(server, env), []);
  assert.equal(env.LISTEN_FDS, undefined);
});

test('serveTransmission: a handshake-less client gets simple replies from the first byte', async (t) => {
  const dir = tempDir(t);
  const img = await rawFile(dir, 'a.raw', Buffer.alloc(MiB, 0x3c));
  const server = new NbdServer({ exports: [{ name: 'k', device: await openRawDevice(t, img), readOnly: false }] });
  t.after(() => server.close());
  const path = join(dir, 'pair.sock');
  const pairServer = createServer({ allowHalfOpen: true });
  t.after(() => pairServer.close());
  let served: Promise<void> | undefined;
  pairServer.on('connection', (s) => (served = server.serveTransmission(s, 'k', { structuredReplies: false })));
  await new Promise<void>((r) => pairServer.listen(path, r));
  const client = await connectUnix(path);
  const w = watch(client);
  client.write(request(0, 1, 4096, 512));
  await waitFor(() => w.bytes().length >= 16 + 512, 5000, 'read reply');
  const r = w.bytes();
  assert.equal(r.readUInt32BE(0), 0x67446698);
  assert.equal(r.readUInt32BE(4), 0);
  assert.equal(r.readBigUInt64BE(8), 1n);
  assert.ok(r.subarray(16, 16 + 512).every((b) => b === 0x3c));
  // What the kernel would be told: read-write, flush/FUA/trim/zeroes, no DF without structured replies.
  const d = server.describeExport('k');
  assert.equal(d.sizeBytes, MiB);
  assert.equal(d.transmissionFlags & 0x2, 0);
  assert.equal(d.transmissionFlags & (0x4 | 0x8 | 0x20 | 0x40), 0x4 | 0x8 | 0x20 | 0x40);
  assert.equal(d.transmissionFlags & 0x80, 0);
  assert.equal(server.describeExport('k', { structuredReplies: true }).transmissionFlags & 0x80, 0x80);
  client.write(request(2, 2, 0, 0)); // NBD_CMD_DISC
  await w.closed;
  await served;
  assert.equal(server.connectionCount, 0);
});

test('serveTransmission on a socket descriptor: large writes are read in place, then read back', async (t) => {
  const dir = tempDir(t);
  const img = await rawFile(dir, 'a.raw', Buffer.alloc(4 * MiB));
  const server = new NbdServer({ exports: [{ name: 'k', device: await openRawDevice(t, img), readOnly: false }] });
  t.after(() => server.close());
  // Like the kernel attach: one end of a socketpair for the server, the other for the "kernel".
  const [serverFd, clientFd] = socketPair();
  const served = server.serveTransmission(serverFd, 'k', { structuredReplies: false });
  const client = new NetSocket({ fd: clientFd, readable: true, writable: true });
  const w = watch(client);
  const payloads = [randomBytes(MiB), randomBytes(300_000), randomBytes(4096)];
  const offsets = [0, MiB + 512, 3 * MiB];
  payloads.forEach((p, i) => client.write(Buffer.concat([request(1, i + 1, offsets[i]!, p.length), p])));
  await waitFor(() => w.bytes().length >= 3 * 16, 5000, 'write replies');
  const cookies = [0, 1, 2].map((i) => w.bytes().readBigUInt64BE(i * 16 + 8)).sort();
  assert.deepEqual(cookies, [1n, 2n, 3n]);
  for (let i = 0; i < 3; i++) assert.equal(w.bytes().readUInt32BE(i * 16 + 4), 0, 'no error');
  const file = readFileSync(img);
  payloads.forEach((p, i) => assert.ok(file.subarray(offsets[i]!, offsets[i]! + p.length).equals(p), `write ${i + 1} on disk`));
  client.write(request(0, 9, offsets[1]!, payloads[1]!.length));
  await waitFor(() => w.bytes().length >= 3 * 16 + 16 + payloads[1]!.length, 5000, 'read reply');
  assert.ok(w.bytes().subarray(3 * 16 + 16).equals(payloads[1]!));
  client.write(request(2, 10, 0, 0)); // NBD_CMD_DISC
  await w.closed;
  await served;
});
