// NbdClient against a scripted server on a unix socket: replies out of order, split and
// interleaved chunks, and every protocol violation the client must catch. Real servers
// never misbehave on purpose, so this is where violations are exercised; the interop tests
// cover the real peers.

import assert from 'node:assert/strict';
import net from 'node:net';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { NbdClient } from '../../src/client/nbd-client.js';
import { NbdOptionError } from '../../src/client/errors.js';
import { ImgbdError, ProtocolError, RequestError } from '../../src/errors.js';
import { tempDir, waitFor } from '../helpers/peers.js';

const u16 = (n: number): Buffer => Buffer.from([n >> 8, n & 255]);
const u32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
};
const u64 = (n: number | bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
};
const cat = (...parts: Buffer[]): Buffer => Buffer.concat(parts);
const OPT_MAGIC = Buffer.from('0003e889045565a9', 'hex');

function optReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  return cat(OPT_MAGIC, u32(option), u32(type), u32(data.length), data);
}
function simple(cookie: bigint, error: number, data: Buffer = Buffer.alloc(0)): Buffer {
  return cat(u32(0x67446698), u32(error), u64(cookie), data);
}
function chunk(cookie: bigint, flags: number, type: number, payload: Buffer): Buffer {
  return cat(u32(0x668e33ef), u16(flags), u16(type), u64(cookie), u32(payload.length), payload);
}
const dataChunk = (cookie: bigint, done: boolean, offset: number, data: Buffer): Buffer => chunk(cookie, done ? 1 : 0, 1, cat(u64(offset), data));
const holeChunk = (cookie: bigint, done: boolean, offset: number, len: number): Buffer => chunk(cookie, done ? 1 : 0, 2, cat(u64(offset), u32(len)));
const noneChunk = (cookie: bigint): Buffer => chunk(cookie, 1, 0, Buffer.alloc(0));
const errorChunk = (cookie: bigint, done: boolean, error: number, msg: string): Buffer =>
  chunk(cookie, done ? 1 : 0, 0x8001, cat(u32(error), u16(Buffer.byteLength(msg)), Buffer.from(msg)));
const statusChunk = (cookie: bigint, done: boolean, id: number, descs: [number, number][]): Buffer =>
  chunk(cookie, done ? 1 : 0, 5, cat(u32(id), ...descs.map(([l, f]) => cat(u32(l), u32(f)))));

interface Req {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
  payload?: Buffer;
}

interface FakeOptions {
  structured?: boolean;
  contexts?: [number, string][];
  go?: 'ok' | 'unsup' | 'unknown';
  sizeBytes?: number;
  transmissionFlags?: number;
  blockSize?: [number, number, number];
  onRequest: (req: Req, sock: net.Socket, server: FakeServer) => void;
}

interface FakeServer {
  path: string;
  requests: Req[];
  options: number[];
  exportNameUsed: string | null;
  outstanding: number;
  maxOutstanding: number;
  sawDisc: boolean;
}

/** A byte reader over a socket: read(n) resolves with exactly n bytes. */
function reader(sock: net.Socket): (n: number) => Promise<Buffer> {
  let buf = Buffer.alloc(0);
  let want: { n: number; resolve: (b: Buffer) => void } | null = null;
  const pump = (): void => {
    if (want && buf.length >= want.n) {
      const out = buf.subarray(0, want.n);
      buf = buf.subarray(want.n);
      const w = want;
      want = null;
      w.resolve(out);
    }
  };
  sock.on('data', (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    pump();
  });
  return (n) =>
    new Promise((resolve) => {
      want = { n, resolve };
      pump();
    });
}

async function fakeServer(t: TestContext, opts: FakeOptions): Promise<FakeServer> {
  const path = join(tempDir(t), 'sock');
  const state: FakeServer = { path, requests: [], options: [], exportNameUsed: null, outstanding: 0, maxOutstanding: 0, sawDisc: false };
  const size = opts.sizeBytes ?? 1 << 20;
  const tflags = opts.transmissionFlags ?? 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0080 | 0x0400 | 0x0800;
  const conns = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    conns.add(sock);
    sock.on('error', () => undefined);
    const read = reader(sock);
    void (async () => {
      sock.write(cat(Buffer.from('NBDMAGICIHAVEOPT'), u16(3)));
      await read(4);
      for (;;) {
        const h = await read(16);
        const option = h.readUInt32BE(8);
        const data = await read(h.readUInt32BE(12));
        state.options.push(option);
        if (option === 1) {
          state.exportNameUsed = data.toString();
          sock.write(cat(u64(size), u16(tflags)));
          break;
        }
        if (option === 8) sock.write(optReply(8, opts.structured === false ? 0x80000001 : 1));
        else if (option === 10) {
          for (const [id, name] of opts.contexts ?? [[7, 'base:allocation']]) sock.write(optReply(10, 4, cat(u32(id), Buffer.from(name))));
          sock.write(optReply(10, 1));
        } else if (option === 7) {
          const go = opts.go ?? 'ok';
          if (go === 'unsup') sock.write(optReply(7, 0x80000001));
          else if (go === 'unknown') sock.write(optReply(7, 0x80000006, Buffer.from('no such export')));
          else {
            if (opts.blockSize) sock.write(optReply(7, 3, cat(u16(3), ...opts.blockSize.map(u32))));
            sock.write(optReply(7, 3, cat(u16(0), u64(size), u16(tflags))));
            sock.write(optReply(7, 1));
            break;
          }
        } else if (option === 2) {
          sock.write(optReply(2, 1));
          sock.end();
          return;
        } else sock.write(optReply(option, 0x80000001));
      }
      for (;;) {
        const h = await read(28);
        const req: Req = { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), offset: Number(h.readBigUInt64BE(16)), length: h.readUInt32BE(24) };
        if (req.type === 1) req.payload = await read(req.length);
        if (req.type === 2) {
          state.sawDisc = true;
          sock.end();
          return;
        }
        state.requests.push(req);
        state.outstanding++;
        state.maxOutstanding = Math.max(state.maxOutstanding, state.outstanding);
        opts.onRequest(req, sock, state);
      }
    })();
  });
  await new Promise<void>((r) => server.listen(path, r));
  // Clients a test leaves connected must not keep the process alive.
  t.after(() => {
    for (const c of conns) c.destroy();
    server.close();
  });
  return state;
}

const uri = (s: FakeServer): string => `nbd+unix:///e?socket=${s.path}`;
const isProtocolError = (re: RegExp) => (e: unknown) => e instanceof ProtocolError && re.test(e.message);

/** Collect requests until `n` arrived, then let the test reply to all of them. */
function batch(n: number, reply: (reqs: Req[], sock: net.Socket, s: FakeServer) => void): FakeOptions['onRequest'] {
  const reqs: Req[] = [];
  return (req, sock, s) => {
    reqs.push(req);
    if (reqs.length === n) reply(reqs.splice(0), sock, s);
  };
}

describe('NbdClient against a scripted server', () => {
  it('matches out-of-order replies by cookie and assembles split, interleaved chunks', async (t) => {
    const s = await fakeServer(t, {
      onRequest: batch(3, (reqs, sock) => {
        const [a, b, c] = reqs as [Req, Req, Req];
        // c first; a and b interleaved, each split into data and hole pieces out of offset order
        sock.write(dataChunk(c.cookie, true, c.offset, Buffer.alloc(c.length, 0xcc)));
        sock.write(dataChunk(a.cookie, false, a.offset + 8, Buffer.alloc(a.length - 8, 0xaa)));
        sock.write(holeChunk(b.cookie, false, b.offset, 4));
        sock.write(holeChunk(a.cookie, false, a.offset, 8));
        sock.write(dataChunk(b.cookie, false, b.offset + 4, Buffer.alloc(b.length - 4, 0xbb)));
        sock.write(noneChunk(a.cookie));
        sock.write(noneChunk(b.cookie));
      }),
    });
    const c = await NbdClient.connect(uri(s));
    const bufs = [Buffer.alloc(16, 1), Buffer.alloc(16, 1), Buffer.alloc(16, 1)];
    await Promise.all(bufs.map((b, i) => c.pread(b, i * 512)));
    assert.deepEqual(bufs[0], cat(Buffer.alloc(8), Buffer.alloc(8, 0xaa)));
    assert.deepEqual(bufs[1], cat(Buffer.alloc(4), Buffer.alloc(12, 0xbb)));
    assert.deepEqual(bufs[2], Buffer.alloc(16, 0xcc));
    assert.deepEqual(s.options, [8, 10, 7]);
    await c.disconnect();
    assert.equal(s.sawDisc, true);
  });

  it('an error chunk fails only its request, with the wire errno', async (t) => {
    const s = await fakeServer(t, {
      onRequest: (req, sock) => {
        if (req.offset === 0) sock.write(errorChunk(req.cookie, true, 28, 'disk full'));
        else sock.write(dataChunk(req.cookie, true, req.offset, Buffer.alloc(req.length, 9)));
      },
    });
    const c = await NbdClient.connect(uri(s));
    await assert.rejects(c.pread(Buffer.alloc(8), 0), (e: unknown) => e instanceof RequestError && e.errno === 'ENOSPC' && /disk full/.test(e.message));
    const b = Buffer.alloc(8);
    await c.pread(b, 8);
    assert.deepEqual(b, Buffer.alloc(8, 9));
    await c.disconnect();
  });

  const violations: [string, (req: Req, sock: net.Socket) => void, RegExp][] = [
    ['a reply for an unknown cookie', (req, sock) => sock.write(simple(req.cookie + 1000n, 0)), /unknown cookie/],
    ['bad reply magic', (_req, sock) => sock.write(Buffer.from('deadbeef00000000', 'hex')), /magic/],
    ['a data chunk past the request', (req, sock) => sock.write(dataChunk(req.cookie, true, req.offset + 8, Buffer.alloc(16))), /outside the request/],
    ['a chunk before the request', (req, sock) => sock.write(holeChunk(req.cookie, true, req.offset - 1, 2)), /outside the request/],
    [
      'overlapping chunks',
      (req, sock) => sock.write(cat(dataChunk(req.cookie, false, req.offset, Buffer.alloc(10)), holeChunk(req.cookie, true, req.offset + 8, 8))),
      /overlaps/,
    ],
    ['a read reply that leaves a gap', (req, sock) => sock.write(dataChunk(req.cookie, true, req.offset, Buffer.alloc(8))), /covered 8 of 16/],
    ['a simple reply to a read with structured replies', (req, sock) => sock.write(simple(req.cookie, 22)), /simple reply to NBD_CMD_READ/],
    ['a block status chunk for a read', (req, sock) => sock.write(statusChunk(req.cookie, true, 7, [[16, 0]])), /block status chunk in reply to NBD_CMD_READ/],
  ];
  for (const [what, misbehave, re] of violations) {
    it(`${what} fails every pending request with a ProtocolError and closes`, async (t) => {
      const s = await fakeServer(t, { onRequest: batch(3, (reqs, sock) => misbehave(reqs[1]!, sock)) });
      const c = await NbdClient.connect(uri(s));
      const results = await Promise.allSettled([0, 512, 1024].map((off) => c.pread(Buffer.alloc(16), off)));
      for (const r of results) {
        assert.equal(r.status, 'rejected');
        assert.ok(isProtocolError(re)(r.reason), String(r.reason));
      }
      await assert.rejects(c.pread(Buffer.alloc(16), 0), ProtocolError);
      assert.ok(c.failed instanceof ProtocolError);
    });
  }

  it('a structured chunk without structured replies negotiated is a protocol error', async (t) => {
    const s = await fakeServer(t, { structured: false, onRequest: (req, sock) => sock.write(noneChunk(req.cookie)) });
    const c = await NbdClient.connect(uri(s));
    assert.equal(c.structuredReplies, false);
    assert.equal(c.metaContexts.size, 0);
    await assert.rejects(c.flush(), isProtocolError(/not negotiated/));
  });

  it('simple replies carry read payloads when structured replies are off', async (t) => {
    const s = await fakeServer(t, {
      structured: false,
      onRequest: batch(2, (reqs, sock) => {
        sock.write(simple(reqs[1]!.cookie, 0, Buffer.alloc(reqs[1]!.length, 2)));
        sock.write(simple(reqs[0]!.cookie, 5));
      }),
    });
    const c = await NbdClient.connect(uri(s), { structuredReplies: false });
    const b = Buffer.alloc(100);
    const [r0, r1] = await Promise.allSettled([c.pread(Buffer.alloc(10), 0), c.pread(b, 100)]);
    assert.ok(r0.status === 'rejected' && r0.reason instanceof RequestError && r0.reason.errno === 'EIO');
    assert.equal(r1.status, 'fulfilled');
    assert.deepEqual(b, Buffer.alloc(100, 2));
    assert.deepEqual(s.options, [7]);
  });

  it('a dropped connection fails pending requests', async (t) => {
    const s = await fakeServer(t, { onRequest: batch(2, (_reqs, sock) => sock.destroy()) });
    const c = await NbdClient.connect(uri(s));
    const results = await Promise.allSettled([c.flush(), c.pread(Buffer.alloc(4), 0)]);
    for (const r of results) assert.ok(r.status === 'rejected' && r.reason instanceof ProtocolError && r.reason.code === 'ERR_NBD_CLOSED');
  });

  it('block status: per-context descriptors; a missing or unknown context is a violation', async (t) => {
    let mode = 0;
    const s = await fakeServer(t, {
      contexts: [
        [7, 'base:allocation'],
        [9, 'qemu:allocation-depth'],
      ],
      onRequest: (req, sock) => {
        if (mode === 0) {
          sock.write(statusChunk(req.cookie, false, 9, [[req.length, 1]]));
          sock.write(statusChunk(req.cookie, true, 7, [[4096, 0], [req.length, 3]]));
        } else if (mode === 1) sock.write(statusChunk(req.cookie, true, 7, [[req.length, 0]]));
      },
    });
    const c = await NbdClient.connect(uri(s), { metaContexts: ['base:allocation', 'qemu:allocation-depth'] });
    const st = await c.blockStatus(0, 65536);
    assert.deepEqual(st.get('base:allocation'), [
      { length: 4096, flags: 0 },
      { length: 65536, flags: 3 },
    ]);
    assert.deepEqual(st.get('qemu:allocation-depth'), [{ length: 65536, flags: 1 }]);
    mode = 1;
    await assert.rejects(c.blockStatus(0, 4096), isProtocolError(/1 of 2 contexts/));
  });

  it('REQ_ONE replies must hold one descriptor within the request', async (t) => {
    const s = await fakeServer(t, { onRequest: (req, sock) => sock.write(statusChunk(req.cookie, true, 7, [[req.length * 2, 0]])) });
    const c = await NbdClient.connect(uri(s));
    await assert.rejects(c.blockStatus(0, 4096, { reqOne: true }), isProtocolError(/REQ_ONE/));
  });

  it('bounds requests in flight and splits reads at the server maximum', async (t) => {
    const s = await fakeServer(t, {
      blockSize: [512, 4096, 65536],
      onRequest: (req, sock, st) =>
        setImmediate(() => {
          st.outstanding--;
          sock.write(dataChunk(req.cookie, true, req.offset, Buffer.alloc(req.length, (req.offset / 65536) & 255)));
        }),
    });
    const c = await NbdClient.connect(uri(s), { maxInFlight: 4 });
    assert.deepEqual(c.blockSizes, { minimum: 512, preferred: 4096, maximum: 65536 });
    const b = Buffer.alloc(1 << 20);
    await c.pread(b, 0);
    assert.equal(s.requests.length, 16);
    assert.ok(s.requests.every((r) => r.length === 65536));
    assert.ok(s.maxOutstanding <= 4, `max outstanding ${s.maxOutstanding}`);
    for (let i = 0; i < 16; i++) assert.equal(b[i * 65536 + 100], i);
    // Unaligned requests never reach the wire.
    await assert.rejects(c.pread(Buffer.alloc(100), 0), (e: unknown) => e instanceof RequestError && e.errno === 'EINVAL');
    await assert.rejects(c.pread(Buffer.alloc(512), 1 << 20), (e: unknown) => e instanceof RequestError && e.errno === 'EINVAL');
    assert.equal(s.requests.length, 16);
    await c.disconnect();
  });

  it('falls back to NBD_OPT_EXPORT_NAME when GO is unsupported', async (t) => {
    const s = await fakeServer(t, { go: 'unsup', sizeBytes: 12345, onRequest: (req, sock) => sock.write(simple(req.cookie, 0)) });
    const c = await NbdClient.connect(uri(s));
    assert.equal(c.sizeBytes, 12345);
    assert.equal(s.exportNameUsed, 'e');
    await c.flush();
    await c.disconnect();
  });

  it('an unknown export is an NbdOptionError with the server message, after a soft disconnect', async (t) => {
    const s = await fakeServer(t, { go: 'unknown', onRequest: () => undefined });
    await assert.rejects(NbdClient.connect(uri(s)), (e: unknown) => e instanceof NbdOptionError && e.code === 'ERR_NBD_REP_ERR_UNKNOWN' && /no such export/.test(e.message));
    assert.equal(s.options.at(-1), 2);
  });

  it('ESHUTDOWN makes the client disconnect', async (t) => {
    const s = await fakeServer(t, { onRequest: (req, sock) => sock.write(errorChunk(req.cookie, true, 108, '')) });
    const c = await NbdClient.connect(uri(s));
    await assert.rejects(c.flush(), (e: unknown) => e instanceof RequestError && e.errno === 'ESHUTDOWN');
    await assert.rejects(c.flush());
    await waitFor(() => s.sawDisc, 5000, 'NBD_CMD_DISC');
  });

  it('a peer that never sends the greeting times out instead of hanging', async (t) => {
    const path = join(tempDir(t), 'silent.sock');
    const conns: net.Socket[] = [];
    const server = net.createServer((sock) => conns.push(sock));
    await new Promise<void>((r) => server.listen(path, r));
    t.after(() => {
      for (const c of conns) c.destroy();
      server.close();
    });
    await assert.rejects(NbdClient.connect(`nbd+unix:///?socket=${path}`, { handshakeTimeoutMs: 200 }), (e: unknown) => e instanceof ProtocolError && /timed out/.test(e.message));
  });

  it('a server that is not NBD is refused by its greeting', async (t) => {
    const path = join(tempDir(t), 'http.sock');
    const server = net.createServer((sock) => sock.end('HTTP/1.1 400 Bad Request\r\n\r\n'));
    await new Promise<void>((r) => server.listen(path, r));
    t.after(() => server.close());
    await assert.rejects(NbdClient.connect(`nbd+unix:///?socket=${path}`), (e: unknown) => e instanceof ProtocolError && /NBDMAGIC/.test(e.message));
    await assert.rejects(NbdClient.connect(`nbd+unix:///?socket=${join(tempDir(t), 'absent.sock')}`), (e: unknown) => e instanceof ImgbdError && e.code === 'ERR_NBD_CONNECT');
  });
});
