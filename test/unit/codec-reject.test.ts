// Decoder rejection tables: one row per malformed input, each asserting the exact error class
// and `code`. The class matters to callers: a ProtocolError kills the connection, an
// OptionDataError is answered with NBD_REP_ERR_INVALID and negotiation goes on, an
// OffsetRangeError marks a 64-bit value this build cannot represent exactly.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ImgbdError, ProtocolError } from '../../src/errors.js';
import { OffsetRangeError } from '../../src/util/u64.js';
import {
  OptionDataError,
  decodeExportNameReply,
  decodeInfoReply,
  decodeInfoRequest,
  decodeMetaContextReply,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeServerEntry,
  decodeServerGreeting,
  encodeInfoRequest,
  encodeInfoString,
  encodeMetaContextReply,
  encodeMetaContextRequest,
  encodeServerEntry,
} from '../../src/protocol/handshake.js';
import {
  decodeBlockStatus,
  decodeErrorChunk,
  decodeOffsetHole,
  decodeReplyHeader,
  decodeRequest,
  encodeErrorChunk,
  encodeOffsetHole,
  encodeRequest,
} from '../../src/protocol/transmission.js';

function hex(...parts: string[]): Buffer {
  const s = parts.join('').replace(/\s+/g, '');
  assert.equal(s.length % 2, 0, 'odd-length hex');
  return Buffer.from(s, 'hex');
}

type ErrorClass = abstract new (...args: never[]) => ImgbdError;

interface Row {
  readonly what: string;
  readonly run: () => unknown;
  readonly cls: ErrorClass;
  readonly code: string;
}

function checkRows(rows: readonly Row[]): void {
  for (const { what, run, cls, code } of rows) {
    assert.throws(
      run,
      (err: unknown) => {
        assert.ok(err instanceof cls, `${what}: threw ${String(err)}, not a ${cls.name}`);
        // Exact class, not merely a subclass: the class decides what the caller does.
        assert.equal(err.name, cls.name, what);
        assert.equal(err.code, code, what);
        return true;
      },
      what,
    );
  }
}

const NBDMAGIC = '4e42444d41474943';
const IHAVEOPT = '49484156454f5054';
const CLISERV = '0000420281861253';
const REPLY_MAGIC = '0003e889045565a9';
const DISK = '6469736b'; // 'disk'
const BASE = '626173653a'; // 'base:'

const INVALID_UTF8: [string, string][] = [
  ['a lone continuation byte', '80'],
  ['a truncated two-byte sequence', 'c3'],
  ['a two-byte lead before ASCII', 'c328'],
  ['an overlong NUL', 'c080'],
  ['an overlong slash', 'e080af'],
  ['a UTF-16 surrogate', 'eda080'],
  ['a code point above U+10FFFF', 'f4908080'],
  ['the byte 0xff', '61ff62'],
];

// ---- handshake framing: all ProtocolError ----

test('server greeting rejections', () => {
  checkRows([
    { what: 'empty', run: () => decodeServerGreeting(Buffer.alloc(0)), cls: ProtocolError, code: 'ERR_NBD_SHORT' },
    { what: '17 bytes', run: () => decodeServerGreeting(hex(NBDMAGIC, IHAVEOPT, '00')), cls: ProtocolError, code: 'ERR_NBD_SHORT' },
    { what: "'NBDMAGIX'", run: () => decodeServerGreeting(hex('4e42444d41474958', IHAVEOPT, '0003')), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    { what: 'IHAVEOPT first', run: () => decodeServerGreeting(hex(IHAVEOPT, IHAVEOPT, '0003')), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    {
      what: 'oldstyle greeting (cliserv magic, size, flags, zeroes)',
      run: () => decodeServerGreeting(hex(NBDMAGIC, CLISERV, '0000000040000000', '00000001', '00'.repeat(124))),
      cls: ProtocolError,
      code: 'ERR_NBD_OLDSTYLE',
    },
    { what: 'option reply magic as second word', run: () => decodeServerGreeting(hex(NBDMAGIC, REPLY_MAGIC, '0003')), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    { what: "'IHAVEOPS'", run: () => decodeServerGreeting(hex(NBDMAGIC, '49484156454f5053', '0003')), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
  ]);
});

test('one-bit mutations of every magic byte are refused', () => {
  const rows: Row[] = [];
  const greeting = hex(NBDMAGIC, IHAVEOPT, '0003');
  const option = hex(IHAVEOPT, '00000007', '00000000');
  const reply = hex(REPLY_MAGIC, '00000007', '00000001', '00000000');
  const request = hex('25609513', '0000', '0000', '0000000000000001', '0000000000000000', '00001000');
  const simple = hex('67446698', '00000000', '0000000000000001');
  const chunk = hex('668e33ef', '0001', '0000', '0000000000000001', '00000000');
  const targets: [string, Buffer, number, (b: Buffer) => unknown][] = [
    ['greeting', greeting, 16, decodeServerGreeting],
    ['option header', option, 8, decodeOptionHeader],
    ['option reply header', reply, 8, decodeOptionReplyHeader],
    ['request', request, 4, (b) => decodeRequest(b)],
    ['simple reply', simple, 4, (b) => decodeReplyHeader(b)],
    ['chunk header', chunk, 4, (b) => decodeReplyHeader(b)],
  ];
  for (const [name, valid, magicBytes, decode] of targets) {
    decode(valid); // the unmutated message is accepted
    for (let i = 0; i < magicBytes; i++) {
      for (let bit = 0; bit < 8; bit++) {
        const bad = Buffer.from(valid);
        bad[i]! ^= 1 << bit;
        rows.push({ what: `${name} byte ${i} bit ${bit}`, run: () => decode(bad), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' });
      }
    }
  }
  checkRows(rows);
});

test('option and option reply header rejections', () => {
  checkRows([
    { what: 'option with NBDMAGIC', run: () => decodeOptionHeader(hex(NBDMAGIC, '00000001', '00000000')), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    { what: 'option with the reply magic', run: () => decodeOptionHeader(hex(REPLY_MAGIC, '00000001', '00000000')), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    { what: 'option reply with IHAVEOPT', run: () => decodeOptionReplyHeader(hex(IHAVEOPT, '00000001', '00000001', '00000000')), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    { what: 'option reply of zeroes', run: () => decodeOptionReplyHeader(Buffer.alloc(20)), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
  ]);
});

// ---- option data: OptionDataError, the server answers NBD_REP_ERR_INVALID ----

function invalid(what: string, run: () => unknown): Row {
  return { what, run, cls: OptionDataError, code: 'ERR_NBD_OPTION_INVALID' };
}

test('NBD_OPT_INFO / NBD_OPT_GO data rejections', () => {
  const info = (...parts: string[]) => () => decodeInfoRequest(hex(...parts));
  checkRows([
    invalid('empty data', info('')),
    invalid('5 bytes', info('00000000', '00')),
    invalid('name length one past the data', info('00000005', DISK, '0000')),
    invalid('name length 2^32-1', info('ffffffff', '0000')),
    invalid('name length leaves no room for the count', info('00000004', DISK, '00')),
    invalid('count 2 with one request', info('00000004', DISK, '0002', '0001')),
    invalid('count 1 with no request', info('00000000', '0001')),
    invalid('count 0 with one request', info('00000004', DISK, '0000', '0001')),
    invalid('count 1 plus a stray byte', info('00000000', '0001', '0003', '00')),
    invalid('count 0xffff with one request', info('00000000', 'ffff', '0003')),
    ...INVALID_UTF8.map(([what, bytes]) => invalid(`name with ${what}`, info((bytes.length / 2).toString(16).padStart(8, '0'), bytes, '0000'))),
    invalid('name of 4097 bytes', info('00001001', '61'.repeat(4097), '0000')),
  ]);
  // The boundary itself is legal.
  assert.equal(decodeInfoRequest(hex('00001000', '61'.repeat(4096), '0000')).name, 'a'.repeat(4096));
});

test('NBD_OPT_{LIST,SET}_META_CONTEXT data rejections', () => {
  const meta = (...parts: string[]) => () => decodeMetaContextRequest(hex(...parts));
  const len = (bytes: string) => (bytes.length / 2).toString(16).padStart(8, '0');
  checkRows([
    invalid('empty data', meta('')),
    invalid('7 bytes', meta('00000000', '000000')),
    invalid('name length one past the data', meta('00000005', DISK, '00000000')),
    invalid('name length 2^32-1', meta('ffffffff', '00000000')),
    invalid('count 1 with no query', meta('00000004', DISK, '00000001')),
    invalid('count 2^32-1', meta('00000000', 'ffffffff', '00000000')),
    invalid('count 2 with one query', meta('00000000', '00000002', '00000005', BASE)),
    invalid('count 1 with two queries', meta('00000000', '00000001', '00000005', BASE, '00000005', BASE)),
    invalid('count 0 with trailing bytes', meta('00000004', DISK, '00000000', '00')),
    invalid('query length one past the data', meta('00000004', DISK, '00000001', '00000006', BASE)),
    invalid('query length 2^32-1', meta('00000000', '00000001', 'ffffffff')),
    invalid('query length cut short', meta('00000000', '00000001', '000000')),
    ...INVALID_UTF8.map(([what, bytes]) => invalid(`name with ${what}`, meta(len(bytes), bytes, '00000000'))),
    ...INVALID_UTF8.map(([what, bytes]) => invalid(`query with ${what}`, meta('00000000', '00000001', len(bytes), bytes))),
    invalid('name of 4097 bytes', meta('00001001', '61'.repeat(4097), '00000000')),
    invalid('query of 4097 bytes', meta('00000000', '00000001', '00001001', '61'.repeat(4097))),
  ]);
  const atLimit = decodeMetaContextRequest(hex('00001000', '61'.repeat(4096), '00000001', '00001000', '62'.repeat(4096)));
  assert.deepEqual(atLimit, { name: 'a'.repeat(4096), queries: ['b'.repeat(4096)] });
});

// ---- option replies: ProtocolError, the client hangs up ----

function badReply(what: string, run: () => unknown): Row {
  return { what, run, cls: ProtocolError, code: 'ERR_NBD_BAD_REPLY' };
}

test('option reply payload rejections', () => {
  checkRows([
    badReply('NBD_REP_SERVER of 3 bytes', () => decodeServerEntry(hex('000000'))),
    badReply('NBD_REP_SERVER name one past the data', () => decodeServerEntry(hex('00000005', DISK))),
    badReply('NBD_REP_SERVER name length 2^32-1', () => decodeServerEntry(hex('ffffffff'))),
    badReply('NBD_REP_INFO of 0 bytes', () => decodeInfoReply(Buffer.alloc(0))),
    badReply('NBD_REP_INFO of 1 byte', () => decodeInfoReply(hex('00'))),
    badReply('NBD_INFO_EXPORT of 2 bytes', () => decodeInfoReply(hex('0000'))),
    badReply('NBD_INFO_EXPORT of 11 bytes', () => decodeInfoReply(hex('0000', '0000000040000000', '01'))),
    badReply('NBD_INFO_EXPORT of 13 bytes', () => decodeInfoReply(hex('0000', '0000000040000000', '0001', '00'))),
    badReply('NBD_INFO_BLOCK_SIZE of 13 bytes', () => decodeInfoReply(hex('0003', '00000001', '00001000', '020000'))),
    badReply('NBD_INFO_BLOCK_SIZE of 15 bytes', () => decodeInfoReply(hex('0003', '00000001', '00001000', '02000000', '00'))),
    badReply('NBD_REP_META_CONTEXT of 3 bytes', () => decodeMetaContextReply(hex('000001'))),
    {
      what: 'NBD_INFO_EXPORT size 2^53',
      run: () => decodeInfoReply(hex('0000', '0020000000000000', '0001')),
      cls: OffsetRangeError,
      code: 'ERR_OFFSET_RANGE',
    },
    {
      what: 'NBD_OPT_EXPORT_NAME reply size 2^64-1',
      run: () => decodeExportNameReply(hex('ffffffffffffffff', '0001')),
      cls: OffsetRangeError,
      code: 'ERR_OFFSET_RANGE',
    },
  ]);
});

// ---- transmission ----

test('request and reply header magic rejections', () => {
  const rest = ['0000', '0000', '0000000000000001', '0000000000000000', '00001000'];
  checkRows([
    { what: 'request with the simple reply magic', run: () => decodeRequest(hex('67446698', ...rest)), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    { what: 'extended-header request (not negotiated)', run: () => decodeRequest(hex('21e41c71', ...rest)), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    { what: 'request magic byte-swapped', run: () => decodeRequest(hex('13956025', ...rest)), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    { what: 'request of zeroes', run: () => decodeRequest(Buffer.alloc(28)), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    { what: 'reply with the request magic', run: () => decodeReplyHeader(hex('25609513', '00000000', '0000000000000001', '00000000')), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    { what: 'structured magic byte-swapped', run: () => decodeReplyHeader(hex('ef338e66', '0001', '0000', '0000000000000001', '00000000')), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
    { what: 'reply of zeroes', run: () => decodeReplyHeader(Buffer.alloc(20)), cls: ProtocolError, code: 'ERR_NBD_BAD_MAGIC' },
  ]);
});

test('BLOCK_STATUS rejections: length 4 + 8n with n >= 1, no zero-length extent', () => {
  const rows: Row[] = [];
  for (const size of [0, 1, 3, 4, 8, 11, 13, 19, 21, 27]) {
    const payload = Buffer.alloc(size, 0x01);
    rows.push(badReply(`${size}-byte payload`, () => decodeBlockStatus(payload)));
  }
  rows.push(
    badReply('zero-length only descriptor', () => decodeBlockStatus(hex('00000001', '00000000', '00000000'))),
    badReply('zero-length first descriptor', () => decodeBlockStatus(hex('00000001', '00000000', '00000003', '00001000', '00000000'))),
    badReply('zero-length last descriptor', () => decodeBlockStatus(hex('00000001', '00001000', '00000000', '00000000', '00000003'))),
  );
  checkRows(rows);
});

test('error chunk rejections', () => {
  checkRows([
    badReply('ERROR of 0 bytes', () => decodeErrorChunk(0x8001, Buffer.alloc(0))),
    badReply('ERROR of 5 bytes', () => decodeErrorChunk(0x8001, hex('00000005', '00'))),
    badReply('ERROR message one past the chunk', () => decodeErrorChunk(0x8001, hex('00000005', '000c', '72656164206661696c6564'))),
    badReply('ERROR message length 0xffff', () => decodeErrorChunk(0x8001, hex('00000005', 'ffff', '00'))),
    badReply('unknown error type, message past the chunk', () => decodeErrorChunk(0x8123, hex('00000005', '0001'))),
    badReply('ERROR_OFFSET of 6 bytes', () => decodeErrorChunk(0x8002, hex('00000005', '0000'))),
    badReply('ERROR_OFFSET of 13 bytes', () => decodeErrorChunk(0x8002, hex('00000005', '0000', '00000000000010'))),
    badReply('ERROR_OFFSET of 15 bytes', () => decodeErrorChunk(0x8002, hex('00000005', '0000', '0000000000001000', '00'))),
    badReply('ERROR_OFFSET message swallows the offset', () => decodeErrorChunk(0x8002, hex('00000005', '0008', '0000000000001000'))),
    {
      what: 'ERROR_OFFSET offset 2^53',
      run: () => decodeErrorChunk(0x8002, hex('00000005', '0000', '0020000000000000')),
      cls: OffsetRangeError,
      code: 'ERR_OFFSET_RANGE',
    },
  ]);
});

test('OFFSET_HOLE rejections', () => {
  checkRows([
    badReply('0 bytes', () => decodeOffsetHole(Buffer.alloc(0))),
    badReply('11 bytes', () => decodeOffsetHole(hex('0000000000001000', '000010'))),
    badReply('13 bytes', () => decodeOffsetHole(hex('0000000000001000', '00001000', '00'))),
    { what: 'offset 2^53', run: () => decodeOffsetHole(hex('0020000000000000', '00001000')), cls: OffsetRangeError, code: 'ERR_OFFSET_RANGE' },
    { what: 'offset 2^64-1', run: () => decodeOffsetHole(hex('ffffffffffffffff', '00001000')), cls: OffsetRangeError, code: 'ERR_OFFSET_RANGE' },
  ]);
});

test('a request offset above 2^53-1 decodes as +Infinity, so range checks refuse it', () => {
  const request = (offset: string) => hex('25609513', '0000', '0000', '0000000000000001', offset, '00001000');
  const cases: [string, number][] = [
    ['001fffffffffffff', Number.MAX_SAFE_INTEGER],
    ['0020000000000000', Number.POSITIVE_INFINITY],
    ['0020000000000001', Number.POSITIVE_INFINITY],
    ['8000000000000000', Number.POSITIVE_INFINITY],
    ['ffffffffffffffff', Number.POSITIVE_INFINITY],
  ];
  for (const [offset, expected] of cases) assert.equal(decodeRequest(request(offset)).offset, expected, offset);
});

// ---- encoder refusals ----

test('encoders refuse what they cannot put on the wire', () => {
  const long = 'a'.repeat(4097);
  const tooLong = (what: string, run: () => unknown): Row => ({ what, run, cls: ImgbdError, code: 'ERR_NBD_STRING_TOO_LONG' });
  const range = (what: string, run: () => unknown): Row => ({ what, run, cls: ImgbdError, code: 'ERR_OFFSET_RANGE' });
  const req = { flags: 0, type: 0, cookie: 1n, length: 512 };
  checkRows([
    tooLong('INFO/GO name of 4097 bytes', () => encodeInfoRequest(long, [])),
    tooLong('INFO/GO name of 4097 bytes in 2-byte characters', () => encodeInfoRequest('é'.repeat(2048) + 'a', [])),
    tooLong('meta-context export name of 4097 bytes', () => encodeMetaContextRequest(long, [])),
    tooLong('meta-context query of 4097 bytes', () => encodeMetaContextRequest('', [long])),
    tooLong('NBD_REP_SERVER name of 4097 bytes', () => encodeServerEntry(long)),
    tooLong('NBD_REP_SERVER description of 4097 bytes', () => encodeServerEntry('disk', long)),
    tooLong('NBD_INFO_NAME of 4097 bytes', () => encodeInfoString(1, long)),
    tooLong('NBD_REP_META_CONTEXT name of 4097 bytes', () => encodeMetaContextReply(1, long)),
    range('request offset 2^53', () => encodeRequest(Buffer.alloc(28), 0, { ...req, offset: 2 ** 53 })),
    range('request offset +Infinity', () => encodeRequest(Buffer.alloc(28), 0, { ...req, offset: Number.POSITIVE_INFINITY })),
    range('request offset -1', () => encodeRequest(Buffer.alloc(28), 0, { ...req, offset: -1 })),
    range('request offset 1.5', () => encodeRequest(Buffer.alloc(28), 0, { ...req, offset: 1.5 })),
    range('hole offset 2^53', () => encodeOffsetHole(Buffer.alloc(12), 0, 2 ** 53, 512)),
    range('error offset NaN', () => encodeErrorChunk(Buffer.alloc(14), 0, 5, Buffer.alloc(0), Number.NaN)),
  ]);
  // 4096 bytes is the limit, not past it.
  assert.equal(encodeInfoRequest('a'.repeat(4096), []).length, 4 + 4096 + 2);
});
