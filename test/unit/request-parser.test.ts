// The request parser against byte streams built by hand (not by the codec under test), fed
// whole, split at every byte, and chopped randomly.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { RequestParser, type ClientMessage, type ParserPhase } from '../../src/protocol/request-parser.js';
import { ProtocolError } from '../../src/errors.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

// client flags: FIXED_NEWSTYLE | NO_ZEROES
const CLIENT_FLAGS = hex('00000003');
// IHAVEOPT, NBD_OPT_STRUCTURED_REPLY (8), length 0
const OPT_SR = hex('49484156454f5054 00000008 00000000');
// IHAVEOPT, NBD_OPT_GO (7), length 10: name "ab" (u32 2), 2 info requests? -> u16 count 1, u16 NBD_INFO_BLOCK_SIZE
const OPT_GO = hex('49484156454f5054 00000007 0000000a 00000002 6162 0001 0003');
// NBD_CMD_READ, flags DF, cookie 0x0102030405060708, offset 4096, length 512
const REQ_READ = hex('25609513 0004 0000 0102030405060708 0000000000001000 00000200');
// NBD_CMD_WRITE, flags FUA, cookie 9, offset 0, length 5, payload "hello"
const REQ_WRITE = hex('25609513 0001 0001 0000000000000009 0000000000000000 00000005 68656c6c6f');
// NBD_CMD_BLOCK_STATUS with offset 2^64-1
const REQ_HUGE_OFFSET = hex('25609513 0008 0007 000000000000000a ffffffffffffffff 00001000');
// NBD_CMD_DISC
const REQ_DISC = hex('25609513 0000 0002 000000000000000b 0000000000000000 00000000');

const STREAM = Buffer.concat([CLIENT_FLAGS, OPT_SR, OPT_GO, REQ_READ, REQ_WRITE, REQ_HUGE_OFFSET, REQ_DISC]);

const EXPECTED: unknown[] = [
  { kind: 'client-flags', flags: 3 },
  { kind: 'option', option: 8, data: '' },
  { kind: 'option', option: 7, data: '0000000261620001' + '0003' },
  { kind: 'request', flags: 4, type: 0, cookie: 0x0102030405060708n, offset: 4096, length: 512, payload: undefined, oversized: false },
  { kind: 'request', flags: 1, type: 1, cookie: 9n, offset: 0, length: 5, payload: '68656c6c6f', oversized: false },
  { kind: 'request', flags: 8, type: 7, cookie: 10n, offset: Infinity, length: 4096, payload: undefined, oversized: false },
  { kind: 'request', flags: 0, type: 2, cookie: 11n, offset: 0, length: 0, payload: undefined, oversized: false },
];

function plain(m: ClientMessage): unknown {
  if (m.kind === 'option') return { ...m, data: m.data.toString('hex') };
  if (m.kind === 'request') return { ...m, payload: m.payload?.toString('hex') };
  return m;
}

/** Feed chunks; switch to transmission after NBD_OPT_GO, as the server does after its ACK. */
function drive(chunks: Buffer[], start: ParserPhase = 'client-flags', limits = {}): unknown[] {
  const p = new RequestParser(start, limits);
  const out: unknown[] = [];
  for (const c of chunks) {
    p.push(c);
    for (let m = p.next(); m !== null; m = p.next()) {
      out.push(plain(m));
      if (m.kind === 'option' && m.option === 7) p.enterTransmission();
    }
  }
  assert.ok(p.idle, 'parser left bytes behind');
  return out;
}

test('parses a whole handshake and transmission stream', () => {
  assert.deepEqual(drive([STREAM]), EXPECTED);
});

test('parses the stream split at every byte into two pieces', () => {
  for (let i = 0; i <= STREAM.length; i++) {
    assert.deepEqual(drive([STREAM.subarray(0, i), STREAM.subarray(i)]), EXPECTED, `split at ${i}`);
  }
});

test('parses the stream split at every pair of bytes into three pieces', () => {
  for (let i = 0; i <= STREAM.length; i += 3) {
    for (let j = i; j <= STREAM.length; j++) {
      assert.deepEqual(drive([STREAM.subarray(0, i), STREAM.subarray(i, j), STREAM.subarray(j)]), EXPECTED, `split at ${i},${j}`);
    }
  }
});

test('parses the stream fed one byte at a time', () => {
  const chunks = [...STREAM].map((b) => Buffer.from([b]));
  assert.deepEqual(drive(chunks), EXPECTED);
});

test('payload views do not alias later pushes', () => {
  const p = new RequestParser('transmission');
  const copy = Buffer.from(REQ_WRITE);
  p.push(copy);
  const m = p.next();
  assert.ok(m?.kind === 'request');
  assert.equal(m.payload?.toString(), 'hello');
});

test('a bad option magic is a protocol error', () => {
  const p = new RequestParser('options');
  p.push(hex('49484156454f5055 00000008 00000000'));
  assert.throws(() => p.next(), (e: unknown) => e instanceof ProtocolError && e.code === 'ERR_NBD_BAD_MAGIC');
});

test('a bad request magic and the extended-header magic are protocol errors', () => {
  for (const magic of ['25609514', '21e41c71', '00000000']) {
    const p = new RequestParser('transmission');
    p.push(hex(`${magic} 0000 0000 0000000000000001 0000000000000000 00000200`));
    assert.throws(() => p.next(), (e: unknown) => e instanceof ProtocolError && e.code === 'ERR_NBD_BAD_MAGIC', magic);
  }
});

test('option data over the limit is reported then skipped, even when split', () => {
  const big = Buffer.concat([hex('49484156454f5054 00000003 00000400'), Buffer.alloc(0x400, 0x55), OPT_SR]);
  for (let i = 0; i <= big.length; i += 7) {
    const out = drive([big.subarray(0, i), big.subarray(i)], 'options', { maxOptionBytes: 100 });
    assert.deepEqual(out, [{ kind: 'option-too-big', option: 3, length: 0x400 }, { kind: 'option', option: 8, data: '' }], `split ${i}`);
  }
});

test('an oversized write is reported at once and its payload drained', () => {
  const hdr = hex('25609513 0000 0001 0000000000000001 0000000000000000 00000100');
  const stream = Buffer.concat([hdr, Buffer.alloc(0x100, 0xaa), REQ_DISC]);
  for (let i = 0; i <= stream.length; i += 5) {
    const out = drive([stream.subarray(0, i), stream.subarray(i)], 'transmission', { maxPayloadBytes: 64, maxDrainBytes: 1024 });
    assert.equal(out.length, 2);
    assert.deepEqual(out[0], { kind: 'request', flags: 0, type: 1, cookie: 1n, offset: 0, length: 256, payload: undefined, oversized: true });
    assert.equal((out[1] as { type: number }).type, 2);
  }
});

test('a write beyond the drain cap is a protocol error before any payload arrives', () => {
  const p = new RequestParser('transmission', { maxPayloadBytes: 64, maxDrainBytes: 1024 });
  p.push(hex('25609513 0000 0001 0000000000000001 0000000000000000 ffffffff'));
  assert.throws(() => p.next(), (e: unknown) => e instanceof ProtocolError && e.code === 'ERR_NBD_PAYLOAD_TOO_BIG');
});

test('phase changes in the middle of a message are refused', () => {
  const p = new RequestParser('options');
  p.push(OPT_GO.subarray(0, 20));
  assert.equal(p.next(), null);
  assert.throws(() => p.enterTransmission(), ProtocolError);
});

test('the parser never reads past the message the consumer asked for', () => {
  // After STARTTLS the rest of the bytes are TLS records: they must remain buffered, unparsed.
  const p = new RequestParser('options');
  const starttls = hex('49484156454f5054 00000005 00000000');
  p.push(Buffer.concat([starttls, hex('16030100')]));
  const m = p.next();
  assert.deepEqual(plain(m!), { kind: 'option', option: 5, data: '' });
  assert.equal(p.buffered, 4);
});

// ---- property: random request streams chopped at random points decode identically ----

interface Req {
  flags: number;
  type: number;
  cookie: bigint;
  offset: bigint;
  length: number;
  payload?: Buffer;
}

const reqArb: fc.Arbitrary<Req> = fc
  .record({
    flags: fc.integer({ min: 0, max: 0xffff }),
    type: fc.constantFrom(0, 1, 2, 3, 4, 5, 6, 7, 99),
    cookie: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
    offset: fc.oneof(fc.bigInt({ min: 0n, max: (1n << 53n) - 1n }), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n })),
    length: fc.integer({ min: 0, max: 300 }),
    fill: fc.integer({ min: 0, max: 255 }),
  })
  .map(({ fill, ...r }) => (r.type === 1 ? { ...r, payload: Buffer.alloc(r.length, fill) } : r));

function encode(r: Req): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(0x25609513, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie, 8);
  b.writeBigUInt64BE(r.offset, 16);
  b.writeUInt32BE(r.length, 24);
  return r.payload ? Buffer.concat([b, r.payload]) : b;
}

test('property: random request streams chopped randomly decode identically', () => {
  fc.assert(
    fc.property(fc.array(reqArb, { minLength: 1, maxLength: 20 }), fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 50 }), (reqs, cuts) => {
      const stream = Buffer.concat(reqs.map(encode));
      const chunks: Buffer[] = [];
      let pos = 0;
      for (let i = 0; pos < stream.length; i++) {
        const n = cuts[i % cuts.length]!;
        chunks.push(stream.subarray(pos, pos + n));
        pos += n;
      }
      const got = drive(chunks, 'transmission');
      const want = reqs.map((r) => ({
        kind: 'request',
        flags: r.flags,
        type: r.type,
        cookie: r.cookie,
        offset: r.offset <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(r.offset) : Infinity,
        length: r.length,
        payload: r.type === 1 ? r.payload!.toString('hex') : undefined,
        oversized: false,
      }));
      assert.deepEqual(got, want);
    }),
    { numRuns: 300 },
  );
});

test('a bad request magic is refused as soon as 4 bytes are in, not after 28', () => {
  const p = new RequestParser('transmission');
  // An option header sent after NBD_OPT_GO: 16 bytes, never a whole request.
  p.push(hex('49484156454f5054 00000003 00000000'));
  assert.throws(() => p.next(), (e: unknown) => e instanceof ProtocolError && e.code === 'ERR_NBD_BAD_MAGIC');
  const q = new RequestParser('transmission');
  q.push(hex('256095'));
  assert.equal(q.next(), null);
});
