// NbdClient against qemu-nbd: raw and qcow2 exports, data checked against the file itself
// and against qemu-img, block status and allocation depth checked against nbdinfo on the
// same server.

import assert from 'node:assert/strict';
import { closeSync, existsSync, ftruncateSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { NbdClient } from '../../src/client/nbd-client.js';
import { NbdOptionError } from '../../src/client/errors.js';
import { openNbdDevice } from '../../src/client/nbd-device.js';
import { RequestError } from '../../src/errors.js';
import { requirePeers, runOk, spawnPeer, tempDir, waitFor } from '../helpers/peers.js';

const MiB = 1024 * 1024;

interface Peer {
  readonly sock: string;
  /** Stop the server and wait for it to exit (releases its image locks). */
  stop(): Promise<void>;
}

async function qemuNbd(t: TestContext, dir: string, args: string[]): Promise<Peer> {
  const sock = join(dir, `qemu-nbd-${Math.random().toString(36).slice(2)}.sock`);
  // The PID file is written once qemu-nbd listens: the socket file alone appears at bind().
  const pidFile = `${sock}.pid`;
  const child = spawnPeer(t, 'qemu-nbd', ['-k', sock, `--pid-file=${pidFile}`, ...args]);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const ready = (): boolean => existsSync(pidFile) && readFileSync(pidFile, 'utf8').trim() !== '';
  await waitFor(() => ready() || child.exitCode !== null, 10_000, 'qemu-nbd to listen');
  if (!ready()) throw new Error(`qemu-nbd exited: ${stderr}`);
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  return {
    sock,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

/** A deterministic pseudo-random buffer (xorshift), so mismatches are reproducible. */
function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  return b;
}

/** A sparse raw image: data at a few places, holes elsewhere (only the data is written). */
function makeRaw(path: string, sizeBytes: number): Buffer {
  const content = Buffer.alloc(sizeBytes);
  const ranges = [
    [0, 64 * 1024, 1],
    [3 * MiB + 4096, 200 * 1024, 2],
    [5 * MiB, MiB, 3],
    [sizeBytes - 8192, 8192, 4],
  ] as const;
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, sizeBytes);
    for (const [off, len, seed] of ranges) {
      pattern(len, seed).copy(content, off);
      writeSync(fd, content, off, len, off);
    }
  } finally {
    closeSync(fd);
  }
  return content;
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

/** Merge adjacent extents of equal type so differently-split answers compare equal. */
function normalize(entries: readonly MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const e of entries) {
    const last = out.at(-1);
    if (last && last.type === e.type && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ offset: e.offset, length: e.length, type: e.type });
  }
  return out;
}

async function clientMap(c: NbdClient, context: string): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  let off = 0;
  while (off < c.sizeBytes) {
    const st = await c.blockStatus(off, c.sizeBytes - off);
    const descs = st.get(context);
    assert.ok(descs && descs.length > 0);
    for (const d of descs) {
      const len = Math.min(d.length, c.sizeBytes - off);
      out.push({ offset: off, length: len, type: d.flags });
      off += len;
      if (off >= c.sizeBytes) break;
    }
  }
  return normalize(out);
}

async function nbdinfoMap(uri: string, context = 'base:allocation'): Promise<MapEntry[]> {
  const json = await runOk('nbdinfo', [`--map=${context}`, '--json', uri]);
  return normalize(JSON.parse(json) as MapEntry[]);
}

describe('NbdClient against qemu-nbd', () => {
  it('raw: flags, reads match the file, 256 concurrent random reads, 64 MiB read split', async (t) => {
    if (!requirePeers(t, 'qemu-nbd', 'nbdinfo')) return;
    const dir = tempDir(t);
    const img = join(dir, 'disk.raw');
    const size = 72 * MiB;
    const content = makeRaw(img, size);
    const { sock } = await qemuNbd(t, dir, ['-f', 'raw', '--persistent', '--shared=4', '--discard=unmap', img]);
    const uri = `nbd+unix:///?socket=${sock}`;
    const c = await NbdClient.connect(uri);
    t.after(() => c.close());
    assert.equal(c.sizeBytes, size);
    assert.equal(c.structuredReplies, true);
    assert.deepEqual([...c.metaContexts.keys()], ['base:allocation']);
    assert.equal(c.canWrite, true);
    assert.equal(c.canFlush, true);
    assert.equal(c.canFua, true);
    assert.equal(c.canTrim, true);
    assert.equal(c.canZero, true);
    assert.equal(c.canDf, true);
    assert.equal(c.canCache, true);
    assert.ok(c.blockSizes.minimum >= 1 && c.blockSizes.maximum >= MiB);

    const big = Buffer.alloc(64 * MiB, 0x55);
    await c.pread(big, 4 * MiB);
    assert.ok(big.equals(content.subarray(4 * MiB, 68 * MiB)), '64 MiB read differs from the file');

    let seed = 12345;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    const reads = Array.from({ length: 256 }, () => {
      const len = 1 + rnd(256 * 1024);
      const off = rnd(size - len);
      return { off, buf: Buffer.alloc(len, 0xee) };
    });
    await Promise.all(reads.map((r, i) => c.pread(r.buf, r.off, { df: i % 2 === 0 })));
    for (const r of reads) assert.ok(r.buf.equals(content.subarray(r.off, r.off + r.buf.length)), `read at ${r.off}+${r.buf.length} differs`);

    await c.cache(0, 4 * MiB);
    assert.deepEqual(await clientMap(c, 'base:allocation'), await nbdinfoMap(uri));
    await c.disconnect();
  });

  it('raw: write with FUA, zero with and without NO_HOLE, trim, flush land in the file', async (t) => {
    if (!requirePeers(t, 'qemu-nbd', 'nbdinfo')) return;
    const dir = tempDir(t);
    const img = join(dir, 'disk.raw');
    const size = 16 * MiB;
    const content = makeRaw(img, size);
    const { sock } = await qemuNbd(t, dir, ['-f', 'raw', '--persistent', '--shared=4', '--discard=unmap', '--cache=none', img]);
    const uri = `nbd+unix:///?socket=${sock}`;
    const c = await NbdClient.connect(uri);
    t.after(() => c.close());

    const data = pattern(3 * MiB, 99);
    await c.pwrite(data, 5 * MiB, { fua: true });
    data.copy(content, 5 * MiB);
    // FUA: durable (and so visible in the file) once the promise resolves.
    assert.ok(readFileSync(img).subarray(5 * MiB, 8 * MiB).equals(data));

    await c.zero(5 * MiB, MiB, { noHole: true });
    content.fill(0, 5 * MiB, 6 * MiB);
    await c.zero(6 * MiB, MiB);
    content.fill(0, 6 * MiB, 7 * MiB);
    await c.trim(9 * MiB, MiB);
    content.fill(0, 9 * MiB, 10 * MiB);
    await c.flush();

    const back = Buffer.alloc(size);
    await c.pread(back, 0);
    assert.ok(back.equals(content));
    assert.ok(readFileSync(img).equals(content));
    const map = await clientMap(c, 'base:allocation');
    assert.deepEqual(map, await nbdinfoMap(uri));
    const at = (off: number): number => map.find((e) => e.offset <= off && off < e.offset + e.length)!.type;
    assert.equal(at(5 * MiB) & 1, 0, 'NO_HOLE zero must stay allocated');
    assert.equal(at(6 * MiB), 3, 'zero without NO_HOLE was punched');
    assert.equal(at(9 * MiB), 3, 'trim was punched');

    await assert.rejects(c.pwrite(Buffer.alloc(512), size - 256), (e: unknown) => e instanceof RequestError && e.errno === 'ENOSPC');
    await c.disconnect();
  });

  it('qcow2 with a backing file: allocation depth and block status match nbdinfo; writes pass qemu-img check', async (t) => {
    if (!requirePeers(t, 'qemu-nbd', 'qemu-img', 'nbdinfo')) return;
    const dir = tempDir(t);
    const base = join(dir, 'base.raw');
    const top = join(dir, 'top.qcow2');
    const content = makeRaw(base, 8 * MiB);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', base, top]);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 1M 64k', '-c', 'write -z 2M 64k', top]);
    content.fill(0x61, MiB, MiB + 64 * 1024);
    content.fill(0, 2 * MiB, 2 * MiB + 64 * 1024);
    const { sock, stop } = await qemuNbd(t, dir, ['-f', 'qcow2', '--persistent', '--shared=4', '--allocation-depth', top]);
    const uri = `nbd+unix:///?socket=${sock}`;

    const dev = await openNbdDevice(uri);
    t.after(() => dev.close());
    assert.equal(dev.capabilities().allocationDepth, true);
    assert.equal(dev.capabilities().extents, true);
    const whole = Buffer.alloc(dev.sizeBytes);
    await dev.pread(whole, 0);
    assert.ok(whole.equals(content));

    const depth: MapEntry[] = [];
    for (let off = 0; off < dev.sizeBytes; ) {
      const ext = await dev.allocationDepth!(off, dev.sizeBytes - off);
      for (const e of ext) {
        depth.push({ offset: off, length: e.length, type: e.depth });
        off += e.length;
      }
    }
    assert.deepEqual(normalize(depth), await nbdinfoMap(uri, 'qemu:allocation-depth'));
    const depthAt = (off: number): number => depth.find((e) => e.offset <= off && off < e.offset + e.length)!.type;
    assert.equal(depthAt(MiB), 1, 'written in the top image');
    assert.equal(depthAt(0), 2, 'from the backing file');

    const extents: MapEntry[] = [];
    for (let off = 0; off < dev.sizeBytes; ) {
      const ext = await dev.extents!(off, dev.sizeBytes - off);
      assert.ok(ext.length > 0);
      for (const e of ext) {
        extents.push({ offset: off, length: e.length, type: e.flags });
        off += e.length;
      }
    }
    assert.deepEqual(normalize(extents), await nbdinfoMap(uri));

    const data = pattern(256 * 1024, 7);
    await dev.pwrite!(data, 3 * MiB, { fua: true });
    data.copy(content, 3 * MiB);
    await dev.zero!(4 * MiB, 128 * 1024, { mayTrim: true });
    content.fill(0, 4 * MiB, 4 * MiB + 128 * 1024);
    await dev.flush!();
    await dev.close();
    await stop();
    const expected = join(dir, 'expected.raw');
    writeFileSync(expected, content);
    await runOk('qemu-img', ['check', '-f', 'qcow2', top]);
    await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', top, expected]);
  });

  it('-x NAME -D DESC: list, info, unknown export; read-only refuses writes before the wire', async (t) => {
    if (!requirePeers(t, 'qemu-nbd')) return;
    const dir = tempDir(t);
    const img = join(dir, 'disk.raw');
    makeRaw(img, 16 * MiB);
    const { sock } = await qemuNbd(t, dir, ['-f', 'raw', '--persistent', '--shared=4', '-r', '-x', 'my disk', '-D', 'a description', img]);
    const base = `nbd+unix:///?socket=${sock}`;

    assert.deepEqual(await NbdClient.list(base), [{ name: 'my disk', description: 'a description' }]);
    const info = await NbdClient.info(base, 'my disk');
    assert.equal(info.sizeBytes, 16 * MiB);
    assert.equal(info.description, 'a description');
    assert.ok(info.blockSizes);
    await assert.rejects(NbdClient.info(base, 'nope'), (e: unknown) => e instanceof NbdOptionError && e.code === 'ERR_NBD_REP_ERR_UNKNOWN');
    await assert.rejects(NbdClient.connect(base), (e: unknown) => e instanceof NbdOptionError && e.code === 'ERR_NBD_REP_ERR_UNKNOWN');
    assert.ok((await NbdClient.listMetaContexts(`nbd+unix:///my%20disk?socket=${sock}`)).includes('base:allocation'));

    const c = await NbdClient.connect(`nbd+unix:///my%20disk?socket=${sock}`);
    t.after(() => c.close());
    assert.equal(c.canWrite, false);
    assert.equal(c.description, 'a description');
    await assert.rejects(c.pwrite(Buffer.alloc(512), 0), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM');
    await c.disconnect();
  });

  it('structuredReplies false: simple replies, reads still exact, no block status', async (t) => {
    if (!requirePeers(t, 'qemu-nbd')) return;
    const dir = tempDir(t);
    const img = join(dir, 'disk.raw');
    const content = makeRaw(img, 16 * MiB);
    const { sock } = await qemuNbd(t, dir, ['-f', 'raw', img]);
    const c = await NbdClient.connect(`nbd+unix:///?socket=${sock}`, { structuredReplies: false });
    t.after(() => c.close());
    assert.equal(c.structuredReplies, false);
    assert.equal(c.metaContexts.size, 0);
    const reads = Array.from({ length: 64 }, (_, i) => ({ off: i * 200 * 1024 + i, buf: Buffer.alloc(100 * 1024 + i) }));
    await Promise.all(reads.map((r) => c.pread(r.buf, r.off)));
    for (const r of reads) assert.ok(r.buf.equals(content.subarray(r.off, r.off + r.buf.length)));
    await c.pwrite(Buffer.alloc(4096, 1), 0);
    await c.flush();
    await assert.rejects(c.blockStatus(0, 4096), (e: unknown) => e instanceof RequestError && e.errno === 'ENOTSUP');
    await c.disconnect();
    assert.ok(readFileSync(img).subarray(0, 4096).equals(Buffer.alloc(4096, 1)));
  });
});
