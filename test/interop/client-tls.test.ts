// TLS through NBD_OPT_STARTTLS against nbdkit and qemu-nbd: X.509 with a CA and server
// certificate made by openssl in the test directory (and a client certificate where the
// server verifies peers), and PSK with username:hexkey files. Failures must be typed.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { NbdClient } from '../../src/client/nbd-client.js';
import { NbdOptionError, NbdTlsError } from '../../src/client/errors.js';
import { ImgbdError } from '../../src/errors.js';
import { repoRoot, requirePeers, run, runOk, spawnPeer, tempDir, waitFor } from '../helpers/peers.js';

/** Start a server; its PID file (written once it listens) says when it is ready. */
async function serve(t: TestContext, dir: string, cmd: 'nbdkit' | 'qemu-nbd', args: (sock: string) => string[]): Promise<string> {
  const sock = join(dir, `${cmd}-${Math.random().toString(36).slice(2)}.sock`);
  const pidFile = `${sock}.pid`;
  const child = spawnPeer(t, cmd, [cmd === 'nbdkit' ? `--pidfile=${pidFile}` : `--pid-file=${pidFile}`, ...args(sock)]);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const ready = (): boolean => existsSync(pidFile) && readFileSync(pidFile, 'utf8').trim() !== '';
  await waitFor(() => ready() || child.exitCode !== null, 10_000, `${cmd} to listen`);
  if (!ready()) throw new Error(`${cmd} exited: ${stderr}`);
  return sock;
}

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

/** A CA in `dir` (ca-cert.pem, ca-key.pem). */
async function makeCa(dir: string, cn: string): Promise<void> {
  mkdirSync(dir, { recursive: true });
  await runOk('openssl', ['req', '-x509', ...EC, '-keyout', join(dir, 'ca-key.pem'), '-out', join(dir, 'ca-cert.pem'), '-days', '2', '-subj', `/CN=${cn}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
}

/** A certificate `<role>-cert.pem` + `<role>-key.pem` in `outDir`, signed by the CA in `caDir`. */
async function issue(caDir: string, outDir: string, role: 'server' | 'client', cn: string): Promise<void> {
  mkdirSync(outDir, { recursive: true });
  const key = join(outDir, `${role}-key.pem`);
  const csr = join(outDir, `${role}.csr`);
  const ext = join(outDir, `${role}.ext`);
  await runOk('openssl', ['req', ...EC, '-keyout', key, '-out', csr, '-subj', `/CN=${cn}`]);
  writeFileSync(ext, `subjectAltName=DNS:${cn}\nextendedKeyUsage=${role === 'server' ? 'serverAuth' : 'clientAuth'}\nkeyUsage=critical,digitalSignature\n`);
  await runOk('openssl', ['x509', '-req', '-in', csr, '-CA', join(caDir, 'ca-cert.pem'), '-CAkey', join(caDir, 'ca-key.pem'), '-CAcreateserial', '-out', join(outDir, `${role}-cert.pem`), '-days', '2', '-extfile', ext]);
}

interface Pki {
  serverDir: string;
  clientDir: string;
  otherCaClientDir: string;
}

async function makePki(dir: string): Promise<Pki> {
  const ca = join(dir, 'ca');
  await makeCa(ca, 'imgbd test CA');
  const serverDir = join(dir, 'server');
  await issue(ca, serverDir, 'server', 'localhost');
  copyFileSync(join(ca, 'ca-cert.pem'), join(serverDir, 'ca-cert.pem'));
  const clientDir = join(dir, 'client');
  await issue(ca, clientDir, 'client', 'imgbd-client');
  copyFileSync(join(ca, 'ca-cert.pem'), join(clientDir, 'ca-cert.pem'));
  const other = join(dir, 'other-ca');
  await makeCa(other, 'unrelated CA');
  const otherCaClientDir = join(dir, 'other-client');
  mkdirSync(otherCaClientDir);
  copyFileSync(join(other, 'ca-cert.pem'), join(otherCaClientDir, 'ca-cert.pem'));
  return { serverDir, clientDir, otherCaClientDir };
}

/** Only the CA, no client certificate. */
function caOnly(dir: string, pki: Pki): string {
  const d = join(dir, 'ca-only');
  mkdirSync(d, { recursive: true });
  copyFileSync(join(pki.clientDir, 'ca-cert.pem'), join(d, 'ca-cert.pem'));
  return d;
}

async function roundTrip(c: NbdClient): Promise<void> {
  const data = randomBytes(256 * 1024);
  await c.pwrite(data, 4096);
  const back = Buffer.alloc(data.length);
  await c.pread(back, 4096);
  assert.ok(back.equals(data));
}

describe('NbdClient over TLS', () => {
  it('nbdkit X.509: STARTTLS, verified chain, data, list; plaintext and wrong CA refused', async (t) => {
    if (!requirePeers(t, 'nbdkit', 'openssl')) return;
    const dir = tempDir(t);
    const pki = await makePki(dir);
    const sock = await serve(t, dir, 'nbdkit', (s) => ['-f', '-U', s, '--tls=require', `--tls-certificates=${pki.serverDir}`, 'memory', '4M']);
    const ca = caOnly(dir, pki);

    const c = await NbdClient.connect(`nbds+unix:///?socket=${sock}&tls-certificates=${ca}`);
    assert.equal(c.tls, true);
    await roundTrip(c);
    await c.disconnect();

    assert.deepEqual(await NbdClient.list(`nbds+unix:///?socket=${sock}&tls-certificates=${ca}`), [{ name: '', description: '' }]);
    // The certificate names localhost: checking that name passes, any other fails.
    const named = await NbdClient.connect(`nbds+unix:///?socket=${sock}&tls-certificates=${ca}&tls-hostname=localhost`);
    await named.disconnect();
    await assert.rejects(NbdClient.connect(`nbds+unix:///?socket=${sock}&tls-certificates=${ca}&tls-hostname=elsewhere.example`), NbdTlsError);

    await assert.rejects(NbdClient.connect(`nbd+unix:///?socket=${sock}`), (e: unknown) => e instanceof NbdOptionError && e.code === 'ERR_NBD_REP_ERR_TLS_REQD');
    await assert.rejects(NbdClient.connect(`nbds+unix:///?socket=${sock}&tls-certificates=${pki.otherCaClientDir}`), NbdTlsError);
    // Verification off: the unrelated CA no longer matters (an explicit, insecure choice).
    const unverified = await NbdClient.connect(`nbds+unix:///?socket=${sock}&tls-certificates=${pki.otherCaClientDir}&tls-verify-peer=0`);
    await roundTrip(unverified);
    await unverified.disconnect();
  });

  it('the imgbd command trusts the CAs NODE_EXTRA_CA_CERTS names, though node no longer reads them at start', async (t) => {
    if (!requirePeers(t, 'nbdkit', 'openssl')) return;
    const dir = tempDir(t);
    const pki = await makePki(dir);
    const sock = await serve(t, dir, 'nbdkit', (s) => ['-f', '-U', s, '--tls=require', `--tls-certificates=${pki.serverDir}`, 'memory', '4M']);
    // No tls-certificates: the chain must verify against the default store.
    const uri = `nbds+unix:///?socket=${sock}`;
    const imgbd = join(repoRoot(), 'bin', 'imgbd');
    const env = { ...process.env };
    delete env.NODE_EXTRA_CA_CERTS;
    delete env.IMGBD_EXTRA_CA_CERTS;
    const untrusted = await run(imgbd, ['info', '--json', uri], { env });
    assert.notEqual(untrusted.code, 0, untrusted.stdout);
    const trusted = await run(imgbd, ['info', '--json', uri], { env: { ...env, NODE_EXTRA_CA_CERTS: join(pki.clientDir, 'ca-cert.pem') } });
    assert.equal(trusted.code, 0, trusted.stderr);
    assert.equal((JSON.parse(trusted.stdout) as { 'export-size': number })['export-size'], 4 * 1024 * 1024);
    // Node itself warns at start about a file it cannot read; through bin/imgbd, a command that
    // makes no TLS connection never looks at it.
    const missing = { ...env, NODE_EXTRA_CA_CERTS: join(dir, 'no-such.pem') };
    const direct = await run(process.execPath, [join(repoRoot(), 'dist', 'src', 'cli', 'main.js'), '--version'], { env: missing });
    assert.match(direct.stderr, /extra certs/);
    const launched = await run(imgbd, ['--version'], { env: missing });
    assert.equal(launched.code, 0);
    assert.doesNotMatch(launched.stderr, /extra certs/);
  });

  it('nbdkit X.509 with --tls-verify-peer: a client certificate is required', async (t) => {
    if (!requirePeers(t, 'nbdkit', 'openssl')) return;
    const dir = tempDir(t);
    const pki = await makePki(dir);
    const sock = await serve(t, dir, 'nbdkit', (s) => ['-f', '-U', s, '--tls=require', `--tls-certificates=${pki.serverDir}`, '--tls-verify-peer', 'memory', '4M']);
    const c = await NbdClient.connect(`nbds+unix:///?socket=${sock}&tls-certificates=${pki.clientDir}`);
    await roundTrip(c);
    await c.disconnect();
    await assert.rejects(NbdClient.connect(`nbds+unix:///?socket=${sock}&tls-certificates=${caOnly(dir, pki)}`), ImgbdError);
  });

  it('nbdkit PSK: username:hexkey file; wrong key and unknown user refused', async (t) => {
    if (!requirePeers(t, 'nbdkit')) return;
    const dir = tempDir(t);
    const keys = join(dir, 'keys.psk');
    writeFileSync(keys, `alice:${randomBytes(32).toString('hex')}\nbob:${randomBytes(32).toString('hex')}\n`);
    const wrong = join(dir, 'wrong.psk');
    writeFileSync(wrong, `alice:${randomBytes(32).toString('hex')}\n`);
    const sock = await serve(t, dir, 'nbdkit', (s) => ['-f', '-U', s, '--tls=require', `--tls-psk=${keys}`, 'memory', '4M']);

    for (const user of ['alice', 'bob']) {
      const c = await NbdClient.connect(`nbds+unix:///?socket=${sock}&tls-psk-file=${keys}&tls-username=${user}`);
      assert.equal(c.tls, true);
      await roundTrip(c);
      await c.disconnect();
    }
    const opts = await NbdClient.connect({ socket: sock }, { tls: { pskFile: keys, username: 'bob' } });
    await opts.disconnect();
    await assert.rejects(NbdClient.connect(`nbds+unix:///?socket=${sock}&tls-psk-file=${wrong}&tls-username=alice`), NbdTlsError);
    await assert.rejects(NbdClient.connect(`nbds+unix:///?socket=${sock}&tls-psk-file=${keys}&tls-username=carol`), (e: unknown) => e instanceof NbdTlsError && /carol/.test(e.message));
  });

  it('qemu-nbd: PSK and X.509 credentials objects', async (t) => {
    if (!requirePeers(t, 'qemu-nbd', 'openssl')) return;
    const dir = tempDir(t);
    const img = join(dir, 'disk.raw');
    writeFileSync(img, Buffer.alloc(4 * 1024 * 1024));
    const pskDir = join(dir, 'psk');
    mkdirSync(pskDir);
    writeFileSync(join(pskDir, 'keys.psk'), `qemu:${randomBytes(32).toString('hex')}\n`);
    const pskSock = await serve(t, dir, 'qemu-nbd', (s) => ['-k', s, '-f', 'raw', '--persistent', '--object', `tls-creds-psk,id=tls0,endpoint=server,dir=${pskDir}`, '--tls-creds', 'tls0', img]);
    const c = await NbdClient.connect(`nbds+unix:///?socket=${pskSock}&tls-psk-file=${join(pskDir, 'keys.psk')}&tls-username=qemu`);
    await roundTrip(c);
    await c.disconnect();

    const pki = await makePki(join(dir, 'pki'));
    const x509Sock = await serve(t, dir, 'qemu-nbd', (s) => ['-k', s, '-f', 'raw', '--persistent', '--object', `tls-creds-x509,id=tls1,endpoint=server,dir=${pki.serverDir}`, '--tls-creds', 'tls1', img]);
    const x = await NbdClient.connect(`nbds+unix:///?socket=${x509Sock}&tls-certificates=${pki.clientDir}`);
    assert.equal(x.tls, true);
    await roundTrip(x);
    await x.disconnect();
    await assert.rejects(NbdClient.connect(`nbd+unix:///?socket=${x509Sock}`), (e: unknown) => e instanceof NbdOptionError && e.code === 'ERR_NBD_REP_ERR_TLS_REQD');
  });

  it('nbds:// to a server without TLS fails instead of downgrading', async (t) => {
    if (!requirePeers(t, 'nbdkit')) return;
    const dir = tempDir(t);
    const keys = join(dir, 'keys.psk');
    writeFileSync(keys, `alice:${randomBytes(32).toString('hex')}\n`);
    const sock = await serve(t, dir, 'nbdkit', (s) => ['-f', '-U', s, '--tls=off', 'memory', '1M']);
    await assert.rejects(NbdClient.connect(`nbds+unix:///?socket=${sock}&tls-psk-file=${keys}&tls-username=alice`), (e: unknown) => e instanceof NbdTlsError && /refused STARTTLS/.test(e.message));
  });
});
