// Hex goldens for the transmission-phase codec, written by hand from nbd-proto.md ("Request
// message", "Simple reply message", "Structured reply chunk message", "Structured reply
// types", "Error values"). Encoders write at a non-zero position into a larger buffer, so
// the tests also pin the returned end position and that neighbouring bytes stay untouched.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  blockStatusPayloadSize,
  decodeBlockStatus,
  decodeErrorChunk,
  decodeOffsetHole,
  decodeReplyHeader,
  decodeRequest,
  encodeBlockStatus,
  encodeChunkHeader,
  encodeErrorChunk,
  encodeOffsetHole,
  encodeRequest,
  encodeSimpleReply,
  errorChunkSize,
  replyHeaderSize,
  type BlockDescriptor,
  type Request,
} from '../../src/protocol/transmission.js';
import {
  NBD_CMD,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  isReplyTypeError,
} from '../../src/protocol/constants.js';
import { errnoToWire, wireToErrno } from '../../src/protocol/errno.js';
import type { NbdErrno } from '../../src/errors.js';

function hex(...parts: string[]): Buffer {
  const s = parts.join('').replace(/\s+/g, '');
  assert.equal(s.length % 2, 0, 'odd-length hex golden');
  return Buffer.from(s, 'hex');
}

const PAD = 3; // encode at an odd position to catch encoders that assume pos 0
const FILL = 0xa5;

/** Run an encoder at PAD inside a FILL-ed buffer; check its return value and the guard bytes. */
function encodeAt(size: number, encode: (buf: Buffer, pos: number) => number): Buffer {
  const buf = Buffer.alloc(PAD + size + PAD, FILL);
  const end = encode(buf, PAD);
  assert.equal(end, PAD + size, 'encoder returned the wrong end position');
  for (const i of [0, 1, 2, buf.length - 3, buf.length - 2, buf.length - 1]) {
    assert.equal(buf[i], FILL, `encoder wrote outside its bytes at ${i}`);
  }
  return buf.subarray(PAD, PAD + size);
}

function assertBytes(actual: Buffer, expected: Buffer): void {
  assert.equal(actual.toString('hex'), expected.toString('hex'));
}

// ---- requests ----

const REQUEST_MAGIC_HEX = '25609513';

const requestGoldens: { what: string; req: Request; wire: Buffer }[] = [
  {
    what: 'READ',
    req: { flags: 0, type: NBD_CMD.READ, cookie: 1n, offset: 0, length: 4096 },
    wire: hex(REQUEST_MAGIC_HEX, '0000', '0000', '0000000000000001', '0000000000000000', '00001000'),
  },
  {
    what: 'READ with DF, max cookie, offset 2^53-1, length 2^32-1',
    req: { flags: NBD_CMD_FLAG_DF, type: NBD_CMD.READ, cookie: 0xffffffffffffffffn, offset: Number.MAX_SAFE_INTEGER, length: 0xffffffff },
    wire: hex(
      REQUEST_MAGIC_HEX, //  magic
      '0004', //             command flags: DF (bit 2)
      '0000', //             NBD_CMD_READ
      'ffffffffffffffff', // cookie 2^64-1: opaque, all 64 bits kept
      '001fffffffffffff', // offset 2^53-1
      'ffffffff', //         length 2^32-1
    ),
  },
  {
    what: 'WRITE with FUA at 1 TiB',
    req: { flags: NBD_CMD_FLAG_FUA, type: NBD_CMD.WRITE, cookie: 0x0102030405060708n, offset: 2 ** 40, length: 65536 },
    wire: hex(
      REQUEST_MAGIC_HEX, //  magic
      '0001', //             command flags: FUA (bit 0)
      '0001', //             NBD_CMD_WRITE
      '0102030405060708', // cookie: byte order visible
      '0000010000000000', // offset 2^40
      '00010000', //         length 64 KiB
    ),
  },
  {
    what: 'DISC',
    req: { flags: 0, type: NBD_CMD.DISC, cookie: 0n, offset: 0, length: 0 },
    wire: hex(REQUEST_MAGIC_HEX, '0000', '0002', '0000000000000000', '0000000000000000', '00000000'),
  },
  {
    what: 'FLUSH',
    req: { flags: 0, type: NBD_CMD.FLUSH, cookie: 0x8000000000000000n, offset: 0, length: 0 },
    wire: hex(REQUEST_MAGIC_HEX, '0000', '0003', '8000000000000000', '0000000000000000', '00000000'),
  },
  {
    what: 'TRIM with FUA',
    req: { flags: NBD_CMD_FLAG_FUA, type: NBD_CMD.TRIM, cookie: 7n, offset: 0x1000, length: 0x100000 },
    wire: hex(REQUEST_MAGIC_HEX, '0001', '0004', '0000000000000007', '0000000000001000', '00100000'),
  },
  {
    what: 'CACHE',
    req: { flags: 0, type: NBD_CMD.CACHE, cookie: 8n, offset: 0xfffff000, length: 0x1000 },
    wire: hex(REQUEST_MAGIC_HEX, '0000', '0005', '0000000000000008', '00000000fffff000', '00001000'),
  },
  {
    what: 'WRITE_ZEROES with NO_HOLE and FAST_ZERO',
    req: { flags: NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO, type: NBD_CMD.WRITE_ZEROES, cookie: 9n, offset: 2 ** 32, length: 0x80000000 },
    wire: hex(
      REQUEST_MAGIC_HEX, //  magic
      '0012', //             command flags: NO_HOLE (bit 1) | FAST_ZERO (bit 4)
      '0006', //             NBD_CMD_WRITE_ZEROES
      '0000000000000009', // cookie
      '0000000100000000', // offset 2^32: the high word matters
      '80000000', //         length 2^31: no sign trouble
    ),
  },
  {
    what: 'BLOCK_STATUS with REQ_ONE',
    req: { flags: NBD_CMD_FLAG_REQ_ONE, type: NBD_CMD.BLOCK_STATUS, cookie: 10n, offset: 0x123456789a, length: 0x10000000 },
    wire: hex(
      REQUEST_MAGIC_HEX, //  magic
      '0008', //             command flags: REQ_ONE (bit 3)
      '0007', //             NBD_CMD_BLOCK_STATUS
      '000000000000000a', // cookie
      '000000123456789a', // offset
      '10000000', //         length 256 MiB
    ),
  },
  {
    what: 'RESIZE',
    req: { flags: 0, type: NBD_CMD.RESIZE, cookie: 11n, offset: 0, length: 0 },
    wire: hex(REQUEST_MAGIC_HEX, '0000', '0008', '000000000000000b', '0000000000000000', '00000000'),
  },
];

for (const { what, req, wire } of requestGoldens) {
  test(`request golden: ${what}`, () => {
    assert.equal(wire.length, 28);
    assertBytes(encodeAt(28, (buf, pos) => encodeRequest(buf, pos, req)), wire);
    assert.deepEqual(decodeRequest(wire), req);
    // Decoding at a position inside a larger buffer reads the same fields.
    assert.deepEqual(decodeRequest(Buffer.concat([hex('ffffff'), wire, hex('ff')]), 3), req);
  });
}

// ---- simple replies ----

test('simple reply goldens', () => {
  const cases: { error: number; cookie: bigint; wire: Buffer }[] = [
    {
      error: 0,
      cookie: 1n,
      wire: hex(
        '67446698', //         NBD_SIMPLE_REPLY_MAGIC
        '00000000', //         error 0: success
        '0000000000000001', // cookie
      ),
    },
    {
      error: errnoToWire('EIO'),
      cookie: 0xffffffffffffffffn,
      wire: hex('67446698', '00000005', 'ffffffffffffffff'), // NBD_EIO, max cookie
    },
    {
      error: errnoToWire('ESHUTDOWN'),
      cookie: 0xdeadbeefcafef00dn,
      wire: hex('67446698', '0000006c', 'deadbeefcafef00d'), // NBD_ESHUTDOWN (108)
    },
  ];
  for (const { error, cookie, wire } of cases) {
    assertBytes(encodeAt(16, (buf, pos) => encodeSimpleReply(buf, pos, error, cookie)), wire);
    assert.equal(replyHeaderSize(wire.readUInt32BE(0)), 16);
    assert.deepEqual(decodeReplyHeader(wire), { kind: 'simple', error, cookie });
  }
});

// ---- structured chunk headers ----

const STRUCTURED_MAGIC_HEX = '668e33ef';

test('structured chunk header goldens, one per reply type', () => {
  const cases: { flags: number; type: number; cookie: bigint; length: number; wire: Buffer }[] = [
    {
      flags: NBD_REPLY_FLAG_DONE,
      type: NBD_REPLY_TYPE.NONE,
      cookie: 1n,
      length: 0,
      wire: hex(
        STRUCTURED_MAGIC_HEX, // NBD_STRUCTURED_REPLY_MAGIC
        '0001', //               flags: DONE
        '0000', //               NBD_REPLY_TYPE_NONE
        '0000000000000001', //   cookie
        '00000000', //           payload length 0
      ),
    },
    {
      flags: 0,
      type: NBD_REPLY_TYPE.OFFSET_DATA,
      cookie: 2n,
      length: 8 + 4096,
      wire: hex(STRUCTURED_MAGIC_HEX, '0000', '0001', '0000000000000002', '00001008'), // OFFSET_DATA, 8 + 4096
    },
    {
      flags: 0,
      type: NBD_REPLY_TYPE.OFFSET_HOLE,
      cookie: 3n,
      length: 12,
      wire: hex(STRUCTURED_MAGIC_HEX, '0000', '0002', '0000000000000003', '0000000c'), // OFFSET_HOLE, 12
    },
    {
      flags: NBD_REPLY_FLAG_DONE,
      type: NBD_REPLY_TYPE.BLOCK_STATUS,
      cookie: 0xffffffffffffffffn,
      length: 28,
      wire: hex(STRUCTURED_MAGIC_HEX, '0001', '0005', 'ffffffffffffffff', '0000001c'), // BLOCK_STATUS, 4 + 3*8
    },
    {
      flags: NBD_REPLY_FLAG_DONE,
      type: NBD_REPLY_TYPE.ERROR,
      cookie: 5n,
      length: 17,
      wire: hex(STRUCTURED_MAGIC_HEX, '0001', '8001', '0000000000000005', '00000011'), // ERROR (2^15 + 1)
    },
    {
      flags: 0,
      type: NBD_REPLY_TYPE.ERROR_OFFSET,
      cookie: 6n,
      length: 22,
      wire: hex(STRUCTURED_MAGIC_HEX, '0000', '8002', '0000000000000006', '00000016'), // ERROR_OFFSET (2^15 + 2)
    },
    {
      // Unknown flags and types are carried through for the caller to judge.
      flags: 0xfffe,
      type: 0xffff,
      cookie: 7n,
      length: 0xffffffff,
      wire: hex(STRUCTURED_MAGIC_HEX, 'fffe', 'ffff', '0000000000000007', 'ffffffff'),
    },
  ];
  for (const { flags, type, cookie, length, wire } of cases) {
    assertBytes(encodeAt(20, (buf, pos) => encodeChunkHeader(buf, pos, flags, type, cookie, length)), wire);
    assert.equal(replyHeaderSize(wire.readUInt32BE(0)), 20);
    assert.deepEqual(decodeReplyHeader(wire), { kind: 'structured', flags, type, cookie, length });
  }
  for (const type of [0x8001, 0x8002, 0x8000, 0xffff]) assert.equal(isReplyTypeError(type), true);
  for (const type of [0, 1, 2, 5, 6, 0x7fff]) assert.equal(isReplyTypeError(type), false);
  assert.equal(replyHeaderSize(0x25609513), 0); // a request magic is no reply
});

// ---- structured payloads ----

test('OFFSET_HOLE goldens: a whole chunk, header then payload', () => {
  const cases: { offset: number; size: number; payload: Buffer }[] = [
    {
      offset: 2 ** 32 + 512,
      size: 65536,
      payload: hex(
        '0000000100000200', // offset 2^32 + 512
        '00010000', //         hole size 64 KiB
      ),
    },
    {
      offset: Number.MAX_SAFE_INTEGER,
      size: 0xffffffff,
      payload: hex('001fffffffffffff', 'ffffffff'), // offset 2^53-1, size 2^32-1
    },
  ];
  for (const { offset, size, payload } of cases) {
    const wire = hex(STRUCTURED_MAGIC_HEX, '0001', '0002', '000000000000002a', '0000000c', payload.toString('hex'));
    const built = encodeAt(32, (buf, pos) => {
      const p = encodeChunkHeader(buf, pos, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE.OFFSET_HOLE, 42n, 12);
      return encodeOffsetHole(buf, p, offset, size);
    });
    assertBytes(built, wire);
    assert.deepEqual(decodeReplyHeader(wire), { kind: 'structured', flags: 1, type: 2, cookie: 42n, length: 12 });
    assert.deepEqual(decodeOffsetHole(wire.subarray(20)), { offset, length: size });
  }
});

test('BLOCK_STATUS golden with several descriptors', () => {
  const descriptors: BlockDescriptor[] = [
    { length: 65536, flags: 0 },
    { length: 0x100000, flags: NBD_STATE_HOLE | NBD_STATE_ZERO },
    { length: 512, flags: NBD_STATE_ZERO },
    { length: 0xffffffff, flags: 0xffffffff },
  ];
  const payload = hex(
    '00000001', // metadata context id 1
    '00010000', // extent 64 KiB
    '00000000', //   allocated, data
    '00100000', // extent 1 MiB
    '00000003', //   NBD_STATE_HOLE | NBD_STATE_ZERO
    '00000200', // extent 512
    '00000002', //   NBD_STATE_ZERO
    'ffffffff', // extent 2^32-1
    'ffffffff', //   every status bit: flags are context-defined, passed through
  );
  assert.equal(blockStatusPayloadSize(4), 36);
  assertBytes(encodeAt(36, (buf, pos) => encodeBlockStatus(buf, pos, 1, descriptors)), payload);
  assert.deepEqual(decodeBlockStatus(payload), { contextId: 1, descriptors });

  const single = hex('fffffffe', '00001000', '00000001'); // context 2^32-2, 4 KiB hole
  assert.equal(blockStatusPayloadSize(1), 12);
  assertBytes(encodeAt(12, (buf, pos) => encodeBlockStatus(buf, pos, 0xfffffffe, [{ length: 4096, flags: 1 }])), single);
  assert.deepEqual(decodeBlockStatus(single), { contextId: 0xfffffffe, descriptors: [{ length: 4096, flags: 1 }] });
});

test('ERROR chunk goldens', () => {
  const message = Buffer.from('read failed', 'utf8');
  const payload = hex(
    '00000005', //                 NBD_EIO
    '000b', //                     message length 11
    '72656164206661696c6564', //   'read failed'
  );
  assert.equal(errorChunkSize(message, false), 17);
  assertBytes(encodeAt(17, (buf, pos) => encodeErrorChunk(buf, pos, 5, message)), payload);
  assert.deepEqual(decodeErrorChunk(0x8001, payload), { error: 5, message: 'read failed' });

  const bare = hex('00000016', '0000'); // NBD_EINVAL, no message
  assert.equal(errorChunkSize(Buffer.alloc(0), false), 6);
  assertBytes(encodeAt(6, (buf, pos) => encodeErrorChunk(buf, pos, 22, Buffer.alloc(0))), bare);
  assert.deepEqual(decodeErrorChunk(NBD_REPLY_TYPE.ERROR, bare), { error: 22, message: '' });

  // An unknown error type (bit 15 set) starts with the same fields and decodes like ERROR.
  assert.deepEqual(decodeErrorChunk(0x8064, payload), { error: 5, message: 'read failed' });
});

test('ERROR_OFFSET chunk goldens', () => {
  const message = Buffer.from('no space', 'utf8');
  const payload = hex(
    '0000001c', //         NBD_ENOSPC (28)
    '0008', //             message length 8
    '6e6f207370616365', // 'no space'
    '0000000012345000', // offset of the failure
  );
  assert.equal(errorChunkSize(message, true), 22);
  assertBytes(encodeAt(22, (buf, pos) => encodeErrorChunk(buf, pos, 28, message, 0x12345000)), payload);
  assert.deepEqual(decodeErrorChunk(0x8002, payload), { error: 28, message: 'no space', offset: 0x12345000 });

  const bare = hex('00000001', '0000', '001fffffffffffff'); // NBD_EPERM, no message, offset 2^53-1
  assert.equal(errorChunkSize(Buffer.alloc(0), true), 14);
  assertBytes(encodeAt(14, (buf, pos) => encodeErrorChunk(buf, pos, 1, Buffer.alloc(0), Number.MAX_SAFE_INTEGER)), bare);
  assert.deepEqual(decodeErrorChunk(NBD_REPLY_TYPE.ERROR_OFFSET, bare), { error: 1, message: '', offset: Number.MAX_SAFE_INTEGER });
});

// ---- error values ----

test('errno goldens: the spec table both ways, unknown values read as EINVAL', () => {
  const table: [NbdErrno, number][] = [
    ['EPERM', 1],
    ['EIO', 5],
    ['ENOMEM', 12],
    ['EINVAL', 22],
    ['ENOSPC', 28],
    ['EOVERFLOW', 75],
    ['ENOTSUP', 95],
    ['ESHUTDOWN', 108],
  ];
  for (const [name, value] of table) {
    assert.equal(errnoToWire(name), value);
    assert.equal(wireToErrno(value), name);
  }
  // "The client SHOULD treat an unexpected error value as if it had been NBD_EINVAL."
  for (const value of [0, 2, 13, 107, 109, 0xffffffff]) assert.equal(wireToErrno(value), 'EINVAL');
});
