// NbdClient against nbdkit: the memory and file plugins, filters that impose block sizes,
// inject errors, name several exports, and servers without structured replies or without
// fixed newstyle. Block status is checked against nbdinfo on the same server.

import assert from 'node:assert/strict';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { NbdClient } from '../../src/client/nbd-client.js';
import { openNbdDevice } from '../../src/client/nbd-device.js';
import { ProtocolError, RequestError } from '../../src/errors.js';
import { requirePeers, runOk, spawnPeer, tempDir, waitFor } from '../helpers/peers.js';

const MiB = 1024 * 1024;

async function nbdkit(t: TestContext, args: string[]): Promise<string> {
  const dir = tempDir(t);
  const sock = join(dir, 'nbdkit.sock');
  // nbdkit writes its PID file once it is listening: the socket file alone appears at bind().
  const pidFile = join(dir, 'nbdkit.pid');
  const child = spawnPeer(t, 'nbdkit', ['-f', '-P', pidFile, '-U', sock, ...args]);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  await waitFor(() => ready(pidFile) || child.exitCode !== null, 10_000, 'nbdkit to listen');
  if (!ready(pidFile)) throw new Error(`nbdkit exited: ${stderr}`);
  return sock;
}

function ready(pidFile: string): boolean {
  return existsSync(pidFile) && readFileSync(pidFile, 'utf8').trim() !== '';
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 255;
  }
  return b;
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

function normalize(entries: readonly MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const e of entries) {
    const last = out.at(-1);
    if (last && last.type === e.type && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ offset: e.offset, length: e.length, type: e.type });
  }
  return out;
}

async function clientMap(c: NbdClient): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  for (let off = 0; off < c.sizeBytes; ) {
    const descs = (await c.blockStatus(off, c.sizeBytes - off)).get('base:allocation')!;
    for (const d of descs) {
      if (off >= c.sizeBytes) break;
      const len = Math.min(d.length, c.sizeBytes - off);
      out.push({ offset: off, length: len, type: d.flags });
      off += len;
    }
  }
  return normalize(out);
}

async function nbdinfoMap(uri: string): Promise<MapEntry[]> {
  return normalize(JSON.parse(await runOk('nbdinfo', ['--map', '--json', uri])) as MapEntry[]);
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

const isErrno = (errno: string) => (e: unknown) => e instanceof RequestError && e.errno === errno;

describe('NbdClient against nbdkit', () => {
  it('memory: write, FUA, zero (NO_HOLE, fast), trim, cache, DF reads; block status matches nbdinfo', async (t) => {
    if (!requirePeers(t, 'nbdkit', 'nbdinfo')) return;
    const sock = await nbdkit(t, ['memory', '64M']);
    const uri = `nbd+unix:///?socket=${sock}`;
    const c = await NbdClient.connect(uri);
    t.after(() => c.close());
    assert.equal(c.sizeBytes, 64 * MiB);
    for (const f of ['canWrite', 'canFlush', 'canFua', 'canTrim', 'canZero', 'canFastZero', 'canDf', 'canCache', 'canMultiConn'] as const) assert.equal(c[f], true, f);
    assert.equal(c.isRotational, false);
    const model = Buffer.alloc(c.sizeBytes);

    const a = pattern(5 * MiB + 123, 1);
    await c.pwrite(a, 1000, { fua: true });
    a.copy(model, 1000);
    const b = pattern(40 * MiB, 2);
    await c.pwrite(b, 20 * MiB);
    b.copy(model, 20 * MiB);
    await c.zero(2 * MiB, MiB, { noHole: true });
    model.fill(0, 2 * MiB, 3 * MiB);
    await c.zero(24 * MiB, 8 * MiB, { fast: true });
    model.fill(0, 24 * MiB, 32 * MiB);
    await c.trim(40 * MiB, 4 * MiB, { fua: true });
    model.fill(0, 40 * MiB, 44 * MiB);
    await c.flush();
    await c.cache(0, 8 * MiB);

    const back = Buffer.alloc(c.sizeBytes, 0xff);
    await c.pread(back, 0);
    assert.ok(back.equals(model));
    const df = Buffer.alloc(MiB);
    await c.pread(df, 20 * MiB + 7, { df: true });
    assert.ok(df.equals(model.subarray(20 * MiB + 7, 21 * MiB + 7)));

    const map = await clientMap(c);
    assert.deepEqual(map, await nbdinfoMap(uri));
    assert.ok(map.some((e) => e.type === 0) && map.some((e) => e.type === 3), 'the map has both data and holes');
    const one = await c.blockStatus(24 * MiB, MiB, { reqOne: true });
    assert.equal(one.get('base:allocation')!.length, 1);
    assert.ok(one.get('base:allocation')![0]!.length <= MiB);

    assert.deepEqual(await NbdClient.listMetaContexts(uri), ['base:allocation']);
    await assert.rejects(c.pread(Buffer.alloc(2), c.sizeBytes - 1), isErrno('EINVAL'));
    await c.disconnect();
  });

  it('file: 256 concurrent random reads and writes checked against the file', async (t) => {
    if (!requirePeers(t, 'nbdkit')) return;
    const dir = tempDir(t);
    const file = join(dir, 'disk.img');
    const content = pattern(32 * MiB, 3);
    writeFileSync(file, content);
    const sock = await nbdkit(t, ['file', file]);
    const c = await NbdClient.connect(`nbd+unix:///?socket=${sock}`, { maxInFlight: 32 });
    t.after(() => c.close());

    let seed = 777;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    const reads = Array.from({ length: 256 }, () => {
      const len = 1 + rnd(128 * 1024);
      return { off: rnd(content.length - len), buf: Buffer.alloc(len) };
    });
    await Promise.all(reads.map((r) => c.pread(r.buf, r.off)));
    for (const r of reads) assert.ok(r.buf.equals(content.subarray(r.off, r.off + r.buf.length)), `read at ${r.off}`);

    // Non-overlapping writes in flight together, each landing where it was aimed.
    const writes = Array.from({ length: 256 }, (_, i) => ({ off: i * 128 * 1024 + rnd(1000), buf: pattern(1 + rnd(64 * 1024), i + 10) }));
    await Promise.all(writes.map((w, i) => c.pwrite(w.buf, w.off, { fua: i % 3 === 0 })));
    await c.flush();
    for (const w of writes) w.buf.copy(content, w.off);
    assert.ok(readFileSync(file).equals(content));
    await c.disconnect();
  });

  it('blocksize-policy: the advertised sizes are obeyed (splitting) and enforced', async (t) => {
    if (!requirePeers(t, 'nbdkit')) return;
    const sock = await nbdkit(t, [
      '--filter=blocksize-policy',
      'memory',
      '8M',
      'blocksize-minimum=512',
      'blocksize-preferred=4096',
      'blocksize-maximum=65536',
      'blocksize-error-policy=error',
    ]);
    const c = await NbdClient.connect(`nbd+unix:///?socket=${sock}`);
    t.after(() => c.close());
    assert.deepEqual(c.blockSizes, { minimum: 512, preferred: 4096, maximum: 65536 });
    const data = pattern(3 * MiB, 5);
    await c.pwrite(data, 512);
    const back = Buffer.alloc(3 * MiB);
    await c.pread(back, 512);
    assert.ok(back.equals(data));
    await assert.rejects(c.pread(Buffer.alloc(100), 0), isErrno('EINVAL'));
    await c.disconnect();
  });

  it('error filter: error chunks become RequestErrors and the connection stays usable', async (t) => {
    if (!requirePeers(t, 'nbdkit')) return;
    const sock = await nbdkit(t, ['--filter=error', 'memory', '8M', 'error-pread=EIO', 'error-pread-rate=100%', 'error-zero=ENOSPC', 'error-zero-rate=100%']);
    const c = await NbdClient.connect(`nbd+unix:///?socket=${sock}`);
    t.after(() => c.close());
    await assert.rejects(c.pread(Buffer.alloc(4096), 0), isErrno('EIO'));
    await assert.rejects(c.zero(0, 4096), isErrno('ENOSPC'));
    await c.pwrite(Buffer.alloc(4096, 1), 0);
    await c.flush();
    assert.equal(c.failed, null);
    await c.disconnect();
  });

  it('exportname filter: list names with descriptions, NBD_OPT_INFO, connect by name', async (t) => {
    if (!requirePeers(t, 'nbdkit')) return;
    const sock = await nbdkit(t, ['--filter=exportname', 'memory', '1M', 'exportname=alpha', 'exportname=beta two', 'exportname-list=explicit', 'exportdesc=fixed:some disk']);
    const base = `nbd+unix:///?socket=${sock}`;
    assert.deepEqual(await NbdClient.list(base), [
      { name: 'alpha', description: 'some disk' },
      { name: 'beta two', description: 'some disk' },
    ]);
    const info = await NbdClient.info(base, 'beta two');
    assert.equal(info.sizeBytes, MiB);
    assert.equal(info.description, 'some disk');
    const c = await NbdClient.connect(`nbd+unix:///beta%20two?socket=${sock}`);
    assert.equal(c.exportName, 'beta two');
    assert.equal(c.description, 'some disk');
    await c.disconnect();
  });

  it('--no-sr: simple replies only', async (t) => {
    if (!requirePeers(t, 'nbdkit')) return;
    const sock = await nbdkit(t, ['--no-sr', 'memory', '4M']);
    const c = await NbdClient.connect(`nbd+unix:///?socket=${sock}`);
    t.after(() => c.close());
    assert.equal(c.structuredReplies, false);
    assert.equal(c.canDf, false);
    const data = pattern(3 * MiB, 8);
    await c.pwrite(data, 0);
    const reads = Array.from({ length: 48 }, (_, i) => ({ off: i * 65536, buf: Buffer.alloc(65536 + i) }));
    await Promise.all(reads.map((r) => c.pread(r.buf, r.off)));
    for (const r of reads) assert.ok(r.buf.equals(Buffer.concat([data, Buffer.alloc(MiB)]).subarray(r.off, r.off + r.buf.length)));
    await c.disconnect();
  });

  it('--mask-handshake=0: not fixed newstyle, so NBD_OPT_EXPORT_NAME with the 124 zero bytes', async (t) => {
    if (!requirePeers(t, 'nbdkit')) return;
    const sock = await nbdkit(t, ['--mask-handshake=0', 'memory', '2M']);
    const uri = `nbd+unix:///?socket=${sock}`;
    const c = await NbdClient.connect(uri);
    assert.equal(c.sizeBytes, 2 * MiB);
    assert.equal(c.structuredReplies, false);
    await c.pwrite(Buffer.alloc(512, 3), 512);
    const b = Buffer.alloc(1024);
    await c.pread(b, 0);
    assert.deepEqual(b, Buffer.concat([Buffer.alloc(512), Buffer.alloc(512, 3)]));
    await c.disconnect();
    await assert.rejects(NbdClient.list(uri), ProtocolError);
  });

  it('TCP: nbd://127.0.0.1:PORT and nbd://[::1]:PORT', async (t) => {
    if (!requirePeers(t, 'nbdkit')) return;
    const port = await freePort();
    const child = spawnPeer(t, 'nbdkit', ['-f', '-p', String(port), 'memory', '1M']);
    await waitFor(async () => child.exitCode !== null || (await canConnect(port)), 10_000, 'nbdkit TCP port');
    for (const host of ['127.0.0.1', '[::1]']) {
      const c = await NbdClient.connect(`nbd://${host}:${port}/`);
      assert.equal(c.sizeBytes, MiB);
      await c.pwrite(Buffer.alloc(4096, 5), 8192);
      const b = Buffer.alloc(4096);
      await c.pread(b, 8192);
      assert.deepEqual(b, Buffer.alloc(4096, 5));
      await c.disconnect();
    }
  });

  it('openNbdDevice: capabilities and extents for a BlockDevice user', async (t) => {
    if (!requirePeers(t, 'nbdkit')) return;
    const sock = await nbdkit(t, ['memory', '4M']);
    const dev = await openNbdDevice(`nbd+unix:///?socket=${sock}`);
    t.after(() => dev.close());
    const caps = dev.capabilities();
    assert.equal(caps.writable, true);
    assert.equal(caps.extents, true);
    assert.equal(caps.allocationDepth, false);
    assert.equal(dev.allocationDepth, undefined);
    await dev.pwrite!(Buffer.alloc(65536, 9), MiB);
    const ext = await dev.extents!(0, 2 * MiB);
    assert.deepEqual(normalize(ext.reduce<MapEntry[]>((acc, e) => [...acc, { offset: acc.length ? acc.at(-1)!.offset + acc.at(-1)!.length : 0, length: e.length, type: e.flags }], [])), [
      { offset: 0, length: MiB, type: 3 },
      { offset: MiB, length: 65536, type: 0 },
      { offset: MiB + 65536, length: MiB - 65536, type: 3 },
    ]);
    await dev.close();
  });
});
