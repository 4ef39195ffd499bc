// `imgbd serve` as users run it: the CLI process, its socket, its flags, its signals.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, statSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { repoRoot, requirePeers, runOk, tempDir, waitFor } from '../helpers/peers.js';

const CLI = join(repoRoot(), 'dist/src/cli/main.js');

function serve(t: import('node:test').TestContext, args: string[]): ChildProcess {
  const child = spawn(process.execPath, [CLI, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return child;
}

function exited(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => (child.exitCode !== null ? resolve(child.exitCode) : child.once('exit', (code) => resolve(code))));
}

async function nbdinfo(uri: string): Promise<Record<string, unknown>> {
  const j = JSON.parse(await runOk('nbdinfo', ['--json', uri])) as { exports: Record<string, unknown>[] };
  return j.exports[0]!;
}

test('serve: socket 0600, multi-conn only with --shared > 1, SIGTERM exits 0 and removes the socket', async (t) => {
  if (!requirePeers(t, 'nbdinfo', 'nbdcopy')) return;
  const dir = tempDir(t);
  const img = join(dir, 'disk.raw');
  const data = randomBytes(4 << 20);
  writeFileSync(img, data);

  const sock1 = join(dir, 'one.sock');
  const one = serve(t, ['-f', 'raw', '-k', sock1, '-t', img]);
  await waitFor(() => existsSync(sock1), 20_000, 'the socket');
  assert.equal(statSync(sock1).mode & 0o777, 0o600);
  const uri1 = `nbd+unix:///?socket=${sock1}`;
  assert.equal((await nbdinfo(uri1)).can_multi_conn, false, 'a single-client server must not invite several connections');
  // nbdcopy opens extra connections only when multi-conn is offered: with --shared 1 it must still work.
  const out1 = join(dir, 'out1.raw');
  await runOk('nbdcopy', [uri1, out1]);
  assert.deepEqual(readFileSync(out1), data);
  one.kill('SIGTERM');
  assert.equal(await exited(one), 0);
  assert.equal(existsSync(sock1), false, 'the socket is removed on exit');

  const sock4 = join(dir, 'four.sock');
  const four = serve(t, ['-f', 'raw', '-k', sock4, '-e', '4', '-t', img]);
  await waitFor(() => existsSync(sock4), 20_000, 'the socket');
  const uri4 = `nbd+unix:///?socket=${sock4}`;
  assert.equal((await nbdinfo(uri4)).can_multi_conn, true);
  const out4 = join(dir, 'out4.raw');
  await runOk('nbdcopy', ['--connections=4', uri4, out4]);
  assert.deepEqual(readFileSync(out4), data);
  four.kill('SIGINT');
  assert.equal(await exited(four), 0);
});

test('serve: without -t the server exits after its last client, and --pid-file names it', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  const dir = tempDir(t);
  const img = join(dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(1 << 20));
  const sock = join(dir, 's.sock');
  const pidFile = join(dir, 'serve.pid');
  const child = serve(t, ['-f', 'raw', '-r', '-k', sock, '--pid-file', pidFile, img]);
  await waitFor(() => existsSync(sock) && existsSync(pidFile), 20_000, 'the socket and pid file');
  assert.equal(Number(readFileSync(pidFile, 'utf8')), child.pid);
  const info = await nbdinfo(`nbd+unix:///?socket=${sock}`);
  assert.equal(info.is_read_only, true);
  assert.equal(await exited(child), 0);
  assert.equal(existsSync(pidFile), false);
});

test('serve: TCP binds to loopback by default; bad arguments exit 64 with a hint', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  const dir = tempDir(t);
  const img = join(dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(1 << 20));
  const child = serve(t, ['-f', 'raw', '-p', '0', '-t', img]);
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  await waitFor(() => out.includes('\n'), 20_000, 'the URI on stdout');
  const uri = out.trim();
  assert.match(uri, /^nbd:\/\/127\.0\.0\.1:\d+\/$/);
  assert.equal((await nbdinfo(uri))['export-size'], 1 << 20);
  child.kill('SIGTERM');
  assert.equal(await exited(child), 0);

  const bad = serve(t, ['-k', join(dir, 'x.sock'), '-p', '1234', img]);
  let err = '';
  bad.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  assert.equal(await exited(bad), 64);
  assert.match(err, /either -k SOCKET or -p PORT/);

  // Polling longer than a millisecond would hold every other client up that long.
  const badPoll = serve(t, ['-k', join(dir, 'y.sock'), '--poll-max-us', '5000', img]);
  let pollErr = '';
  badPoll.stderr!.on('data', (d: Buffer) => (pollErr += d.toString()));
  assert.equal(await exited(badPoll), 64);
  assert.match(pollErr, /--poll-max-us/);
});
