// STARTTLS against libnbd (nbdinfo, nbdcopy): X.509 with client certificates, PSK, and
// require mode refusing plaintext. Credentials are made with openssl for each run.

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes, createHash } from 'node:crypto';
import { mkdirSync, copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadPsk, loadX509Dir, parsePskFile } from '../../src/server/tls.js';
import { UsageError } from '../../src/errors.js';
import { requirePeers, run, runOk, tempDir, waitFor } from '../helpers/peers.js';
import { openRawDevice, startServer } from '../helpers/server.js';

const MiB = 1024 * 1024;

/** A CA, a server certificate for localhost, and a client certificate, as qemu/nbdkit lay them out. */
async function makePki(dir: string): Promise<{ serverDir: string; clientDir: string; strangerDir: string }> {
  const o = (...args: string[]): Promise<string> => runOk('openssl', args);
  const p = (name: string): string => join(dir, name);
  await o('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('ca-key.pem'), '-out', p('ca-cert.pem'), '-days', '2', '-subj', '/CN=imgbd test CA');
  const issue = async (name: string, cn: string, ext: string, ca = 'ca'): Promise<void> => {
    writeFileSync(p(`${name}.ext`), ext);
    await o('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', p(`${name}-key.pem`), '-out', p(`${name}.csr`), '-subj', `/CN=${cn}`);
    await o('x509', '-req', '-in', p(`${name}.csr`), '-CA', p(`${ca}-cert.pem`), '-CAkey', p(`${ca}-key.pem`), '-CAcreateserial', '-out', p(`${name}-cert.pem`), '-days', '2', '-extfile', p(`${name}.ext`));
  };
  await issue('server', 'localhost', 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  await issue('client', 'client', 'extendedKeyUsage=clientAuth\n');
  // A second CA and a client certificate from it: not trusted by the server.
  await o('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('other-key.pem'), '-out', p('other-cert.pem'), '-days', '2', '-subj', '/CN=other CA');
  await issue('stranger', 'stranger', 'extendedKeyUsage=clientAuth\n', 'other');

  const serverDir = p('server');
  const clientDir = p('client');
  const strangerDir = p('stranger');
  for (const d of [serverDir, clientDir, strangerDir]) mkdirSync(d);
  copyFileSync(p('ca-cert.pem'), join(serverDir, 'ca-cert.pem'));
  copyFileSync(p('server-cert.pem'), join(serverDir, 'server-cert.pem'));
  copyFileSync(p('server-key.pem'), join(serverDir, 'server-key.pem'));
  copyFileSync(p('ca-cert.pem'), join(clientDir, 'ca-cert.pem'));
  copyFileSync(p('client-cert.pem'), join(clientDir, 'client-cert.pem'));
  copyFileSync(p('client-key.pem'), join(clientDir, 'client-key.pem'));
  copyFileSync(p('ca-cert.pem'), join(strangerDir, 'ca-cert.pem'));
  copyFileSync(p('stranger-cert.pem'), join(strangerDir, 'client-cert.pem'));
  copyFileSync(p('stranger-key.pem'), join(strangerDir, 'client-key.pem'));
  return { serverDir, clientDir, strangerDir };
}

async function rawImage(t: TestContext, dir: string, bytes: Buffer): Promise<{ path: string }> {
  const path = join(dir, 'disk.raw');
  writeFileSync(path, bytes);
  return { path };
}

test('X.509: nbdinfo and nbdcopy over nbds+unix with a client certificate; untrusted clients are refused', async (t) => {
  if (!requirePeers(t, 'openssl', 'nbdinfo', 'nbdcopy')) return;
  const dir = tempDir(t);
  const pki = await makePki(dir);
  const content = randomBytes(2 * MiB);
  const img = await rawImage(t, dir, content);
  const srv = await startServer(t, {
    exports: [{ name: 'secret', description: 'over TLS', device: await openRawDevice(t, img.path), readOnly: false }],
    tls: { mode: 'require', credentials: loadX509Dir(pki.serverDir, true) },
  }, dir);
  const uri = `nbds+unix:///secret?socket=${srv.socketPath}&tls-certificates=${pki.clientDir}`;
  const info = JSON.parse(await runOk('nbdinfo', ['--json', uri]));
  assert.equal(info.TLS, true);
  assert.equal(info.exports[0]['export-size'], 2 * MiB);
  assert.equal(info.exports[0].description, 'over TLS');
  // nbdinfo --is tls exits 0 only when the connection negotiated TLS.
  assert.equal((await run('nbdinfo', ['--is', 'tls', uri])).code, 0);

  const out = join(dir, 'copy.bin');
  await runOk('nbdcopy', [uri, out]);
  assert.equal(createHash('sha256').update(readFileSync(out)).digest('hex'), createHash('sha256').update(content).digest('hex'));
  assert.ok(srv.log.lines.some((l) => /TLS up \(TLSv1\.[23]/.test(l)), srv.log.lines.join('\n'));

  // A client certificate from another CA: the TLS handshake fails, nothing is served.
  const stranger = await run('nbdinfo', ['--json', `nbds+unix:///secret?socket=${srv.socketPath}&tls-certificates=${pki.strangerDir}`]);
  assert.notEqual(stranger.code, 0);
  await waitFor(() => srv.log.lines.some((l) => /TLS handshake failed/.test(l)), 5000, 'the failed handshake to be logged');
  // Plaintext is refused in require mode.
  const plain = await run('nbdinfo', ['--json', `nbd+unix:///secret?socket=${srv.socketPath}`]);
  assert.notEqual(plain.code, 0);
  assert.doesNotMatch(plain.stdout, /export-size/);
  // And the server still serves a good client afterwards.
  assert.equal(JSON.parse(await runOk('nbdinfo', ['--json', uri])).TLS, true);
});

test('PSK: nbds+unix with tls-psk-file and a username; a wrong key is refused', async (t) => {
  if (!requirePeers(t, 'nbdinfo', 'nbdcopy')) return;
  const dir = tempDir(t);
  const keyFile = join(dir, 'keys.psk');
  writeFileSync(keyFile, `alice:${randomBytes(32).toString('hex')}\nbob:${randomBytes(16).toString('hex')}\n`);
  const wrongFile = join(dir, 'wrong.psk');
  writeFileSync(wrongFile, `alice:${randomBytes(32).toString('hex')}\n`);
  const content = randomBytes(MiB);
  const img = await rawImage(t, dir, content);
  const srv = await startServer(t, {
    exports: [{ name: '', device: await openRawDevice(t, img.path), readOnly: false }],
    tls: { mode: 'require', credentials: loadPsk(keyFile) },
  }, dir);
  const uri = (user: string, file: string): string => `nbds+unix://${user}@/?socket=${srv.socketPath}&tls-psk-file=${file}`;
  const info = JSON.parse(await runOk('nbdinfo', ['--json', uri('alice', keyFile)]));
  assert.equal(info.TLS, true);
  assert.equal(info.exports[0]['export-size'], MiB);
  assert.equal(JSON.parse(await runOk('nbdinfo', ['--json', uri('bob', keyFile)])).TLS, true);
  assert.ok(srv.log.lines.some((l) => /TLS up \(TLSv1\.[23]/.test(l)), srv.log.lines.join('\n'));
  if (process.env.IMGBD_TEST_VERBOSE) t.diagnostic(srv.log.lines.join('\n'));
  const out = join(dir, 'out.bin');
  await runOk('nbdcopy', [uri('alice', keyFile), out]);
  assert.ok(readFileSync(out).equals(content));
  const wrong = await run('nbdinfo', ['--json', uri('alice', wrongFile)]);
  assert.notEqual(wrong.code, 0);
  const plain = await run('nbdinfo', ['--json', `nbd+unix:///?socket=${srv.socketPath}`]);
  assert.notEqual(plain.code, 0);
});

test('TLS mode "on" serves both plaintext and TLS clients', async (t) => {
  if (!requirePeers(t, 'nbdinfo')) return;
  const dir = tempDir(t);
  const keyFile = join(dir, 'keys.psk');
  writeFileSync(keyFile, `alice:${randomBytes(32).toString('hex')}\n`);
  const img = await rawImage(t, dir, Buffer.alloc(MiB));
  const srv = await startServer(t, {
    exports: [{ name: '', device: await openRawDevice(t, img.path, true), readOnly: true }],
    tls: { mode: 'on', credentials: loadPsk(keyFile) },
  }, dir);
  assert.equal(JSON.parse(await runOk('nbdinfo', ['--json', `nbd+unix:///?socket=${srv.socketPath}`])).TLS, false);
  assert.equal(JSON.parse(await runOk('nbdinfo', ['--json', `nbds+unix://alice@/?socket=${srv.socketPath}&tls-psk-file=${keyFile}`])).TLS, true);
});

test('PSK files are parsed strictly', () => {
  const keys = parsePskFile('alice:00ff\n\nbob:0102030405\n');
  assert.deepEqual([...keys.keys()], ['alice', 'bob']);
  assert.equal(keys.get('alice')!.toString('hex'), '00ff');
  for (const bad of ['alice', 'alice:', ':00ff', 'alice:0g', 'alice:abc', '']) {
    assert.throws(() => parsePskFile(bad), UsageError, JSON.stringify(bad));
  }
});
