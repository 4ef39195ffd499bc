// The reply parser against hand-written hex, fed whole, split at every byte, and one byte at
// a time; then a property: random reply sequences chopped at random points parse identically.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { ProtocolError } from '../../src/errors.js';
import { ReplyParser, type ReplyEvent } from '../../src/protocol/reply-parser.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

// Hand-built wire bytes (nbd-proto.md layouts), independent of the codec under test.
const GREETING = hex('4e42444d41474943 49484156454f5054 0003');
const ACK_STRUCTURED = hex('0003e889045565a9 00000008 00000001 00000000');
const ACK_GO = hex('0003e889045565a9 00000007 00000001 00000000');
const INTO_TRANSMISSION = Buffer.concat([GREETING, ACK_STRUCTURED, ACK_GO]);

interface Case {
  readonly name: string;
  readonly bytes: Buffer;
  readonly setup?: (p: ReplyParser) => void;
  readonly expected: ReplyEvent[];
  /** Parser started with these bytes already consumed (not split). */
  readonly prefix?: Buffer;
  readonly phase?: 'greeting' | 'options';
  /** Checks on side effects (the read destination) after each parse. */
  readonly check?: () => void;
}

const cases: Case[] = [
  {
    name: 'greeting',
    bytes: GREETING,
    expected: [{ kind: 'greeting', handshakeFlags: 3 }],
  },
  {
    name: 'option replies: SERVER entries then ACK (NBD_OPT_LIST)',
    phase: 'options',
    bytes: hex(
      '0003e889045565a9 00000003 00000002 0000000b  00000003 646973 6d696e65' + // name "dis", description "mine"
        '0003e889045565a9 00000003 00000001 00000000',
    ),
    expected: [
      { kind: 'option-reply', option: 3, type: 2, data: hex('00000003 646973 6d696e65') },
      { kind: 'option-reply', option: 3, type: 1, data: Buffer.alloc(0) },
    ],
  },
  {
    name: 'option reply: error with message',
    phase: 'options',
    bytes: hex('0003e889045565a9 00000007 80000006 00000002 6e6f'),
    expected: [{ kind: 'option-reply', option: 7, type: 0x80000006, data: Buffer.from('no') }],
  },
  {
    name: 'NBD_REP_INFO export then ACK to GO enters transmission',
    phase: 'options',
    bytes: hex('0003e889045565a9 00000007 00000003 0000000c 0000 0000000000100000 0003' + '0003e889045565a9 00000007 00000001 00000000' + '67446698 00000000 0000000000000009'),
    expected: [
      { kind: 'option-reply', option: 7, type: 3, data: hex('0000 0000000000100000 0003') },
      { kind: 'option-reply', option: 7, type: 1, data: Buffer.alloc(0) },
      { kind: 'simple-reply', cookie: 9n, error: 0 },
    ],
  },
  {
    name: 'EXPORT_NAME reply with 124 zero bytes',
    phase: 'options',
    setup: (p) => p.expectExportNameReply(false),
    bytes: Buffer.concat([hex('0000000040000000 0001'), Buffer.alloc(124), hex('67446698 00000005 0000000000000001')]),
    expected: [
      { kind: 'export-name-reply', sizeBytes: 0x40000000, transmissionFlags: 1 },
      { kind: 'simple-reply', cookie: 1n, error: 5 },
    ],
  },
  {
    name: 'EXPORT_NAME reply with NO_ZEROES',
    phase: 'options',
    setup: (p) => p.expectExportNameReply(true),
    bytes: hex('0000000000001000 0003'),
    expected: [{ kind: 'export-name-reply', sizeBytes: 4096, transmissionFlags: 3 }],
  },
  {
    name: 'simple reply with a read payload, then one without',
    phase: 'options',
    prefix: hex('0003e889045565a9 00000007 00000001 00000000'),
    setup: (p) => p.expectRead(0x0102030405060708n, { offset: 0, length: 5 }),
    bytes: hex('67446698 00000000 0102030405060708 68656c6c6f  67446698 00000000 0102030405060708'),
    expected: [
      { kind: 'simple-reply', cookie: 0x0102030405060708n, error: 0, data: Buffer.from('hello') },
      { kind: 'simple-reply', cookie: 0x0102030405060708n, error: 0 },
    ],
  },
  {
    name: 'simple read reply with an error carries no payload',
    phase: 'options',
    prefix: hex('0003e889045565a9 00000007 00000001 00000000'),
    setup: (p) => p.expectRead(7n, { offset: 0, length: 512 }),
    bytes: hex('67446698 00000016 0000000000000007  67446698 00000000 0000000000000008'),
    expected: [
      { kind: 'simple-reply', cookie: 7n, error: 22 },
      { kind: 'simple-reply', cookie: 8n, error: 0 },
    ],
  },
  {
    name: 'structured: OFFSET_DATA, OFFSET_HOLE, NONE',
    prefix: INTO_TRANSMISSION,
    setup: (p) => p.expectRead(1n, { offset: 0, length: 4096 }),
    bytes: hex(
      '668e33ef 0000 0001 0000000000000001 0000000b 0000000000000200 616263' +
        '668e33ef 0000 0002 0000000000000001 0000000c 0000000000000300 00000100' +
        '668e33ef 0001 0000 0000000000000001 00000000',
    ),
    expected: [
      { kind: 'chunk', cookie: 1n, flags: 0, done: false, chunk: { type: 'offset-data', offset: 0x200, data: Buffer.from('abc') } },
      { kind: 'chunk', cookie: 1n, flags: 0, done: false, chunk: { type: 'offset-hole', offset: 0x300, length: 0x100 } },
      { kind: 'chunk', cookie: 1n, flags: 1, done: true, chunk: { type: 'none' } },
    ],
  },
  {
    name: 'structured: BLOCK_STATUS with two descriptors',
    prefix: INTO_TRANSMISSION,
    bytes: hex('668e33ef 0001 0005 00000000000000ff 00000014 00000002 00010000 00000000 00020000 00000003'),
    expected: [
      {
        kind: 'chunk',
        cookie: 0xffn,
        flags: 1,
        done: true,
        chunk: {
          type: 'block-status',
          contextId: 2,
          descriptors: [
            { length: 0x10000, flags: 0 },
            { length: 0x20000, flags: 3 },
          ],
        },
      },
    ],
  },
  {
    name: 'structured: ERROR and ERROR_OFFSET',
    prefix: INTO_TRANSMISSION,
    bytes: hex(
      '668e33ef 0000 8002 0000000000000003 00000010 00000005 0002 6f77 0000000000001000' + '668e33ef 0001 8001 0000000000000003 00000008 0000001c 0002 6e6f',
    ),
    expected: [
      { kind: 'chunk', cookie: 3n, flags: 0, done: false, chunk: { type: 'error', replyType: 0x8002, error: 5, errno: 'EIO', message: 'ow', offset: 0x1000 } },
      { kind: 'chunk', cookie: 3n, flags: 1, done: true, chunk: { type: 'error', replyType: 0x8001, error: 28, errno: 'ENOSPC', message: 'no' } },
    ],
  },
  {
    name: 'structured: unknown error type reads as an error; unknown errno as EINVAL',
    prefix: INTO_TRANSMISSION,
    bytes: hex('668e33ef 0001 8123 0000000000000004 00000006 000003e7 0000'),
    expected: [{ kind: 'chunk', cookie: 4n, flags: 1, done: true, chunk: { type: 'error', replyType: 0x8123, error: 999, errno: 'EINVAL', message: '' } }],
  },
];

// Direct placement: the same wire bytes, with the reads' destinations registered.
const simpleInto = Buffer.alloc(5);
const structuredInto = Buffer.alloc(0x200);
cases.push(
  {
    name: 'simple read reply copied straight into the destination',
    phase: 'options',
    prefix: hex('0003e889045565a9 00000007 00000001 00000000'),
    setup: (p) => {
      simpleInto.fill(0);
      p.expectRead(5n, { offset: 0, length: 5, into: simpleInto });
    },
    bytes: hex('67446698 00000000 0000000000000005 68656c6c6f  67446698 00000000 0000000000000006'),
    expected: [
      { kind: 'simple-reply', cookie: 5n, error: 0, data: Buffer.from('hello') },
      { kind: 'simple-reply', cookie: 6n, error: 0 },
    ],
    check: () => assert.deepEqual(simpleInto, Buffer.from('hello')),
  },
  {
    name: 'structured OFFSET_DATA copied straight into the destination, interleaved with another reply',
    prefix: INTO_TRANSMISSION,
    setup: (p) => {
      structuredInto.fill(0);
      p.expectRead(1n, { offset: 0x1000, length: 0x200, into: structuredInto });
    },
    bytes: hex(
      '668e33ef 0000 0001 0000000000000001 0000000b 0000000000001100 616263' +
        '668e33ef 0001 0000 0000000000000002 00000000' +
        '668e33ef 0001 0001 0000000000000001 0000000a 00000000000011fe 7a7a',
    ),
    expected: [
      { kind: 'chunk', cookie: 1n, flags: 0, done: false, chunk: { type: 'offset-data', offset: 0x1100, data: Buffer.from('abc') } },
      { kind: 'chunk', cookie: 2n, flags: 1, done: true, chunk: { type: 'none' } },
      { kind: 'chunk', cookie: 1n, flags: 1, done: true, chunk: { type: 'offset-data', offset: 0x11fe, data: Buffer.from('zz') } },
    ],
    check: () => {
      const want = Buffer.alloc(0x200);
      want.write('abc', 0x100, 'latin1');
      want.write('zz', 0x1fe, 'latin1');
      assert.deepEqual(structuredInto, want);
    },
  },
);

function newParser(c: Case): ReplyParser {
  const p = new ReplyParser(c.phase !== undefined ? { phase: c.phase } : {});
  if (c.prefix) p.push(c.prefix);
  c.setup?.(p);
  return p;
}

describe('ReplyParser: every message split at every byte', () => {
  for (const c of cases) {
    it(c.name, () => {
      assert.deepStrictEqual(newParser(c).push(c.bytes), c.expected, 'whole');
      for (let i = 0; i <= c.bytes.length; i++) {
        const p = newParser(c);
        const got = [...p.push(c.bytes.subarray(0, i)), ...p.push(c.bytes.subarray(i))];
        assert.deepStrictEqual(got, c.expected, `split at ${i}`);
        assert.equal(p.buffered, 0);
        c.check?.();
      }
      const p = newParser(c);
      const got: ReplyEvent[] = [];
      for (let i = 0; i < c.bytes.length; i++) got.push(...p.push(c.bytes.subarray(i, i + 1)));
      assert.deepStrictEqual(got, c.expected, 'byte by byte');
    });
  }
});

describe('ReplyParser: violations', () => {
  const inTransmission = (): ReplyParser => {
    const p = new ReplyParser();
    p.push(INTO_TRANSMISSION);
    return p;
  };
  const rejects = (p: ReplyParser, bytes: string, re: RegExp): void => {
    assert.throws(
      () => p.push(hex(bytes)),
      (e: unknown) => e instanceof ProtocolError && re.test(e.message),
    );
  };

  it('bad greeting magic', () => rejects(new ReplyParser(), '4e42444d41474944 49484156454f5054 0003', /NBDMAGIC/));
  it('bad option reply magic', () => rejects(new ReplyParser({ phase: 'options' }), '0003e889045565a8 00000007 00000001 00000000', /magic/));
  it('ACK with data', () => rejects(new ReplyParser({ phase: 'options' }), '0003e889045565a9 00000007 00000001 00000001 00', /ACK/));
  it('oversized option reply is refused from its header alone', () =>
    rejects(new ReplyParser({ phase: 'options' }), '0003e889045565a9 00000003 00000002 00100000', /limit/));
  it('bad reply magic', () => rejects(inTransmission(), '12345678', /magic/));
  it('structured chunk without negotiation', () => {
    const p = new ReplyParser({ phase: 'options' });
    p.push(ACK_GO);
    rejects(p, '668e33ef', /not negotiated/);
  });
  it('oversized chunk is refused from its header alone', () =>
    rejects(inTransmission(), '668e33ef 0000 0005 0000000000000001 7fffffff', /limit/));
  it('OFFSET_DATA outside the read is refused before it reaches the destination', () => {
    const p = inTransmission();
    const into = Buffer.alloc(16);
    p.expectRead(1n, { offset: 4096, length: 16, into });
    rejects(p, '668e33ef 0000 0001 0000000000000001 00000010 0000000000001009 ffffffffffffffff', /outside the request/);
    assert.deepEqual(into, Buffer.alloc(16));
  });
  it('OFFSET_DATA longer than the announced read', () => {
    const p = inTransmission();
    p.expectRead(1n, { offset: 0, length: 16 });
    rejects(p, '668e33ef 0000 0001 0000000000000001 00000019', /limit/);
  });
  it('NONE without DONE', () => rejects(inTransmission(), '668e33ef 0000 0000 0000000000000001 00000000', /DONE/));
  it('NONE with a payload', () => rejects(inTransmission(), '668e33ef 0001 0000 0000000000000001 00000001 00', /payload/));
  it('OFFSET_DATA shorter than 9 bytes', () => rejects(inTransmission(), '668e33ef 0001 0001 0000000000000001 00000008 0000000000000000', /at least 9/));
  it('OFFSET_HOLE of zero bytes', () => rejects(inTransmission(), '668e33ef 0001 0002 0000000000000001 0000000c 0000000000000000 00000000', /zero/));
  it('BLOCK_STATUS not 4+8n', () => rejects(inTransmission(), '668e33ef 0001 0005 0000000000000001 00000008 00000001 00000001', /4 \+ 8n/));
  it('unknown non-error chunk type', () => rejects(inTransmission(), '668e33ef 0001 0003 0000000000000001 00000000', /unknown structured reply type/));
  it('error chunk whose message overruns it', () => rejects(inTransmission(), '668e33ef 0001 8001 0000000000000001 00000006 00000005 0001', /message/));
  it('error chunk with error 0', () => rejects(inTransmission(), '668e33ef 0001 8001 0000000000000001 00000006 00000000 0000', /error value 0/));
  it('offset above 2^53-1 is a protocol error, not a rounding', () =>
    rejects(inTransmission(), '668e33ef 0001 0002 0000000000000001 0000000c ffffffffffffff00 00000001', /2\^53-1/));
  it('plaintext after the STARTTLS ACK', () => rejects(new ReplyParser({ phase: 'options' }), '0003e889045565a9 00000005 00000001 00000000 16', /STARTTLS/));
  it('stays failed', () => {
    const p = inTransmission();
    assert.throws(() => p.push(hex('12345678')));
    assert.equal(p.phase, 'failed');
    assert.throws(() => p.push(hex('67446698 00000000 0000000000000001')), ProtocolError);
  });
});

// ---- property: random reply streams, chopped anywhere, parse the same ----

type Msg =
  | { t: 'simple'; cookie: bigint; error: number; read?: Buffer }
  | { t: 'data'; cookie: bigint; done: boolean; offset: number; data: Buffer }
  | { t: 'hole'; cookie: bigint; done: boolean; offset: number; length: number }
  | { t: 'status'; cookie: bigint; done: boolean; id: number; descs: [number, number][] }
  | { t: 'error'; cookie: bigint; done: boolean; error: number; message: string; offset?: number }
  | { t: 'none'; cookie: bigint };

const u64 = (n: number | bigint): string => BigInt(n).toString(16).padStart(16, '0');
const u32 = (n: number): string => n.toString(16).padStart(8, '0');
const u16 = (n: number): string => n.toString(16).padStart(4, '0');

function chunkHex(flags: number, type: number, cookie: bigint, payload: Buffer): Buffer {
  return Buffer.concat([hex('668e33ef' + u16(flags) + u16(type) + u64(cookie) + u32(payload.length)), payload]);
}

function encodeMsg(m: Msg): Buffer {
  switch (m.t) {
    case 'simple':
      return Buffer.concat([hex('67446698' + u32(m.error) + u64(m.cookie)), m.error === 0 && m.read ? m.read : Buffer.alloc(0)]);
    case 'data':
      return chunkHex(m.done ? 1 : 0, 1, m.cookie, Buffer.concat([hex(u64(m.offset)), m.data]));
    case 'hole':
      return chunkHex(m.done ? 1 : 0, 2, m.cookie, hex(u64(m.offset) + u32(m.length)));
    case 'status':
      return chunkHex(m.done ? 1 : 0, 5, m.cookie, hex(u32(m.id) + m.descs.map(([l, f]) => u32(l) + u32(f)).join('')));
    case 'error': {
      const msg = Buffer.from(m.message);
      const tail = m.offset !== undefined ? hex(u64(m.offset)) : Buffer.alloc(0);
      return chunkHex(m.done ? 1 : 0, m.offset !== undefined ? 0x8002 : 0x8001, m.cookie, Buffer.concat([hex(u32(m.error) + u16(msg.length)), msg, tail]));
    }
    case 'none':
      return chunkHex(1, 0, m.cookie, Buffer.alloc(0));
  }
}

const cookieArb = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const doneArb = fc.boolean();
const offsetArb = fc.integer({ min: 0, max: 2 ** 40 });
const structuredMsg: fc.Arbitrary<Msg> = fc.oneof(
  fc.record({ t: fc.constant('data' as const), cookie: cookieArb, done: doneArb, offset: offsetArb, data: fc.uint8Array({ minLength: 1, maxLength: 64 }).map((a) => Buffer.from(a)) }),
  fc.record({ t: fc.constant('hole' as const), cookie: cookieArb, done: doneArb, offset: offsetArb, length: fc.integer({ min: 1, max: 2 ** 32 - 1 }) }),
  fc.record({
    t: fc.constant('status' as const),
    cookie: cookieArb,
    done: doneArb,
    id: fc.integer({ min: 0, max: 2 ** 32 - 1 }),
    descs: fc.array(fc.tuple(fc.integer({ min: 1, max: 2 ** 32 - 1 }), fc.integer({ min: 0, max: 2 ** 32 - 1 })), { minLength: 1, maxLength: 5 }),
  }),
  fc.record(
    { t: fc.constant('error' as const), cookie: cookieArb, done: doneArb, error: fc.integer({ min: 1, max: 200 }), message: fc.string({ maxLength: 20 }), offset: offsetArb },
    { requiredKeys: ['t', 'cookie', 'done', 'error', 'message'] },
  ),
  fc.record({ t: fc.constant('none' as const), cookie: cookieArb }),
);
const simpleMsg: fc.Arbitrary<Msg> = fc.record(
  {
    t: fc.constant('simple' as const),
    cookie: fc.bigInt({ min: 0n, max: 1000n }),
    error: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 120 })),
    read: fc.uint8Array({ minLength: 0, maxLength: 64 }).map((a) => Buffer.from(a)),
  },
  { requiredKeys: ['t', 'cookie', 'error'] },
);

function parseChopped(msgs: readonly Msg[], cuts: readonly number[], direct: boolean): ReplyEvent[] {
  const p = new ReplyParser();
  p.push(INTO_TRANSMISSION);
  // A client announces each read before sending it, so before any of its reply arrives.
  for (const m of msgs) if (m.t === 'simple' && m.read) p.expectRead(m.cookie, { offset: 0, length: m.read.length, ...(direct ? { into: Buffer.alloc(m.read.length) } : {}) });
  const stream = Buffer.concat(msgs.map(encodeMsg));
  const events: ReplyEvent[] = [];
  let pos = 0;
  for (const cut of [...cuts.map((c) => Math.floor(c * stream.length)).sort((a, b) => a - b), stream.length]) {
    events.push(...p.push(stream.subarray(pos, cut)));
    pos = cut;
  }
  assert.equal(p.buffered, 0);
  return events;
}

function expectedEvents(msgs: readonly Msg[]): ReplyEvent[] {
  return msgs.map((m): ReplyEvent => {
    switch (m.t) {
      case 'simple':
        return m.error === 0 && m.read ? { kind: 'simple-reply', cookie: m.cookie, error: 0, data: m.read } : { kind: 'simple-reply', cookie: m.cookie, error: m.error };
      case 'data':
        return { kind: 'chunk', cookie: m.cookie, flags: m.done ? 1 : 0, done: m.done, chunk: { type: 'offset-data', offset: m.offset, data: m.data } };
      case 'hole':
        return { kind: 'chunk', cookie: m.cookie, flags: m.done ? 1 : 0, done: m.done, chunk: { type: 'offset-hole', offset: m.offset, length: m.length } };
      case 'status':
        return {
          kind: 'chunk',
          cookie: m.cookie,
          flags: m.done ? 1 : 0,
          done: m.done,
          chunk: { type: 'block-status', contextId: m.id, descriptors: m.descs.map(([length, flags]) => ({ length, flags })) },
        };
      case 'error': {
        const errnos: Record<number, string> = { 1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 22: 'EINVAL', 28: 'ENOSPC', 75: 'EOVERFLOW', 95: 'ENOTSUP', 108: 'ESHUTDOWN' };
        return {
          kind: 'chunk',
          cookie: m.cookie,
          flags: m.done ? 1 : 0,
          done: m.done,
          chunk: {
            type: 'error',
            replyType: m.offset !== undefined ? 0x8002 : 0x8001,
            error: m.error,
            errno: (errnos[m.error] ?? 'EINVAL') as never,
            message: m.message,
            ...(m.offset !== undefined ? { offset: m.offset } : {}),
          },
        };
      }
      case 'none':
        return { kind: 'chunk', cookie: m.cookie, flags: 1, done: true, chunk: { type: 'none' } };
    }
  });
}

describe('ReplyParser: property', () => {
  it('random structured and simple reply streams chopped randomly parse to the expected events', () => {
    fc.assert(
      fc.property(fc.array(fc.oneof(structuredMsg, simpleMsg), { minLength: 1, maxLength: 12 }), fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 10 }), fc.boolean(), (msgs, cuts, direct) => {
        // Cookies of requests in flight are distinct: simple replies get unique low cookies,
        // structured chunks live above 2^63 so they never meet an announced simple read.
        const fixed = msgs.map((m, i) => (m.t === 'simple' ? { ...m, cookie: BigInt(i) } : { ...m, cookie: m.cookie | (1n << 63n) }));
        assert.deepStrictEqual(parseChopped(fixed, cuts, direct), expectedEvents(fixed));
      }),
      { numRuns: 300 },
    );
  });
});
