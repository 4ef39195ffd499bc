// Hex goldens for the fixed-newstyle handshake codec. Every expected byte is written out by
// hand from nbd-proto.md ("Newstyle negotiation", "Option types", "Option reply types"), so
// a wrong magic, field order or width in the codec (or its constants) fails here. Each golden
// is checked both ways: the encoder produces exactly these bytes and the decoder reads them
// back as exactly these fields.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  decodeClientFlags,
  decodeExportNameReply,
  decodeInfoReply,
  decodeInfoRequest,
  decodeMetaContextReply,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeServerEntry,
  decodeServerGreeting,
  encodeClientFlags,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoRequest,
  encodeInfoString,
  encodeMetaContextReply,
  encodeMetaContextRequest,
  encodeOption,
  encodeOptionReply,
  encodeServerEntry,
  encodeServerGreeting,
} from '../../src/protocol/handshake.js';
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO,
  NBD_OPT,
  NBD_REP,
  isOptionReplyError,
} from '../../src/protocol/constants.js';

/** Concatenate hex fragments (whitespace ignored) into bytes. */
function hex(...parts: string[]): Buffer {
  const s = parts.join('').replace(/\s+/g, '');
  assert.equal(s.length % 2, 0, 'odd-length hex golden');
  return Buffer.from(s, 'hex');
}

function assertBytes(actual: Buffer, expected: Buffer): void {
  assert.equal(actual.toString('hex'), expected.toString('hex'));
}

// ---- server greeting and client flags ----

test('server greeting golden: NBDMAGIC, IHAVEOPT, u16 handshake flags', () => {
  const cases: { flags: number; wire: Buffer }[] = [
    {
      flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
      wire: hex(
        '4e42444d41474943', // 'NBDMAGIC'
        '49484156454f5054', // 'IHAVEOPT'
        '0003', //             handshake flags: FIXED_NEWSTYLE (bit 0) | NO_ZEROES (bit 1)
      ),
    },
    {
      flags: NBD_FLAG_FIXED_NEWSTYLE,
      wire: hex(
        '4e42444d41474943', // 'NBDMAGIC'
        '49484156454f5054', // 'IHAVEOPT'
        '0001', //             handshake flags: FIXED_NEWSTYLE
      ),
    },
  ];
  for (const { flags, wire } of cases) {
    assertBytes(encodeServerGreeting(flags), wire);
    assert.deepEqual(decodeServerGreeting(wire), { handshakeFlags: flags });
  }
});

test('client flags golden: u32', () => {
  const wire = hex('00000003'); // FIXED_NEWSTYLE (bit 0) | NO_ZEROES (bit 1)
  assertBytes(encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES), wire);
  assert.equal(decodeClientFlags(wire), 3);
  assertBytes(encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE), hex('00000001'));
  // Bit 31 must not go negative on the way out or back.
  assertBytes(encodeClientFlags(0x80000000), hex('80000000'));
  assert.equal(decodeClientFlags(hex('80000000')), 0x80000000);
});

// ---- option requests ----

const IHAVEOPT_HEX = '49484156454f5054';

test('option request goldens: options that carry no data', () => {
  const cases: { option: number; code: string }[] = [
    { option: NBD_OPT.ABORT, code: '00000002' },
    { option: NBD_OPT.LIST, code: '00000003' },
    { option: NBD_OPT.STARTTLS, code: '00000005' },
    { option: NBD_OPT.STRUCTURED_REPLY, code: '00000008' },
  ];
  for (const { option, code } of cases) {
    const wire = hex(
      IHAVEOPT_HEX, // 'IHAVEOPT'
      code, //         option
      '00000000', //   data length: none
    );
    assertBytes(encodeOption(option), wire);
    assert.deepEqual(decodeOptionHeader(wire), { option: parseInt(code, 16), length: 0 });
  }
});

test('option request golden: NBD_OPT_EXPORT_NAME carries the bare name', () => {
  const wire = hex(
    IHAVEOPT_HEX, // 'IHAVEOPT'
    '00000001', //   NBD_OPT_EXPORT_NAME
    '00000005', //   data length 5: the name, no length prefix, no NUL
    '64c3ad736b', // 'dísk' in UTF-8 (5 bytes, 4 characters)
  );
  assertBytes(encodeOption(NBD_OPT.EXPORT_NAME, Buffer.from('dísk', 'utf8')), wire);
  assert.deepEqual(decodeOptionHeader(wire), { option: 1, length: 5 });
  assert.equal(wire.subarray(16).toString('utf8'), 'dísk');

  // The empty name selects the default export.
  const empty = hex(IHAVEOPT_HEX, '00000001', '00000000');
  assertBytes(encodeOption(NBD_OPT.EXPORT_NAME, Buffer.alloc(0)), empty);
  assert.deepEqual(decodeOptionHeader(empty), { option: 1, length: 0 });
});

test('option request goldens: NBD_OPT_INFO / NBD_OPT_GO with information requests', () => {
  const cases: { option: number; name: string; infos: number[]; wire: Buffer }[] = [
    {
      option: NBD_OPT.INFO,
      name: 'disk',
      infos: [NBD_INFO.NAME, NBD_INFO.DESCRIPTION, NBD_INFO.BLOCK_SIZE],
      wire: hex(
        IHAVEOPT_HEX, // 'IHAVEOPT'
        '00000006', //   NBD_OPT_INFO
        '00000010', //   data length 16 = 4 + 4 + 2 + 3*2
        '00000004', //   name length 4
        '6469736b', //   'disk'
        '0003', //       3 information requests
        '0001', //       NBD_INFO_NAME
        '0002', //       NBD_INFO_DESCRIPTION
        '0003', //       NBD_INFO_BLOCK_SIZE
      ),
    },
    {
      option: NBD_OPT.GO,
      name: 'dísk',
      infos: [NBD_INFO.BLOCK_SIZE],
      wire: hex(
        IHAVEOPT_HEX, // 'IHAVEOPT'
        '00000007', //   NBD_OPT_GO
        '0000000d', //   data length 13 = 4 + 5 + 2 + 2
        '00000005', //   name length 5 (bytes, not characters)
        '64c3ad736b', // 'dísk'
        '0001', //       1 information request
        '0003', //       NBD_INFO_BLOCK_SIZE
      ),
    },
    {
      option: NBD_OPT.GO,
      name: '',
      infos: [],
      wire: hex(
        IHAVEOPT_HEX, // 'IHAVEOPT'
        '00000007', //   NBD_OPT_GO
        '00000006', //   data length 6: the minimum
        '00000000', //   name length 0: the default export
        '0000', //       no information requests
      ),
    },
    {
      // A leading U+FEFF is part of the name: dropping it as a byte-order mark would open a
      // different export than the one asked for.
      option: NBD_OPT.GO,
      name: '\uFEFFdisk',
      infos: [NBD_INFO.EXPORT],
      wire: hex(
        IHAVEOPT_HEX, // 'IHAVEOPT'
        '00000007', //   NBD_OPT_GO
        '0000000f', //   data length 15 = 4 + 7 + 2 + 2
        '00000007', //   name length 7
        'efbbbf', //     U+FEFF
        '6469736b', //   'disk'
        '0001', //       1 information request
        '0000', //       NBD_INFO_EXPORT
      ),
    },
  ];
  for (const { option, name, infos, wire } of cases) {
    assertBytes(encodeOption(option, encodeInfoRequest(name, infos)), wire);
    const header = decodeOptionHeader(wire);
    assert.deepEqual(header, { option, length: wire.length - 16 });
    assert.deepEqual(decodeInfoRequest(wire.subarray(16)), { name, infos });
  }
});

test('option request goldens: NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT with queries', () => {
  const cases: { option: number; name: string; queries: string[]; wire: Buffer }[] = [
    {
      option: NBD_OPT.LIST_META_CONTEXT,
      name: 'disk',
      queries: ['base:'],
      wire: hex(
        IHAVEOPT_HEX, // 'IHAVEOPT'
        '00000009', //   NBD_OPT_LIST_META_CONTEXT
        '00000015', //   data length 21 = 4 + 4 + 4 + (4 + 5)
        '00000004', //   export name length 4
        '6469736b', //   'disk'
        '00000001', //   1 query
        '00000005', //   query length 5
        '626173653a', // 'base:'
      ),
    },
    {
      option: NBD_OPT.LIST_META_CONTEXT,
      name: 'disk',
      queries: [],
      wire: hex(
        IHAVEOPT_HEX, // 'IHAVEOPT'
        '00000009', //   NBD_OPT_LIST_META_CONTEXT
        '0000000c', //   data length 12
        '00000004', //   export name length 4
        '6469736b', //   'disk'
        '00000000', //   no queries: list everything
      ),
    },
    {
      option: NBD_OPT.SET_META_CONTEXT,
      name: 'disk',
      queries: ['base:allocation', 'qemu:allocation-depth'],
      wire: hex(
        IHAVEOPT_HEX, // 'IHAVEOPT'
        '0000000a', //   NBD_OPT_SET_META_CONTEXT
        '00000038', //   data length 56 = 4 + 4 + 4 + (4 + 15) + (4 + 21)
        '00000004', //   export name length 4
        '6469736b', //   'disk'
        '00000002', //   2 queries
        '0000000f', //   query length 15
        '626173653a616c6c6f636174696f6e', //           'base:allocation'
        '00000015', //   query length 21
        '71656d753a616c6c6f636174696f6e2d6465707468', // 'qemu:allocation-depth'
      ),
    },
    {
      option: NBD_OPT.SET_META_CONTEXT,
      name: '',
      queries: [''],
      wire: hex(
        IHAVEOPT_HEX, // 'IHAVEOPT'
        '0000000a', //   NBD_OPT_SET_META_CONTEXT
        '0000000c', //   data length 12
        '00000000', //   export name length 0 (default export)
        '00000001', //   1 query
        '00000000', //   query length 0
      ),
    },
  ];
  for (const { option, name, queries, wire } of cases) {
    assertBytes(encodeOption(option, encodeMetaContextRequest(name, queries)), wire);
    assert.deepEqual(decodeOptionHeader(wire), { option, length: wire.length - 16 });
    assert.deepEqual(decodeMetaContextRequest(wire.subarray(16)), { name, queries });
  }
});

// ---- option replies ----

const REPLY_MAGIC_HEX = '0003e889045565a9';

test('option reply golden: NBD_REP_ACK has no data', () => {
  const wire = hex(
    REPLY_MAGIC_HEX, // option reply magic
    '00000008', //      NBD_OPT_STRUCTURED_REPLY
    '00000001', //      NBD_REP_ACK
    '00000000', //      length 0
  );
  assertBytes(encodeOptionReply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ACK), wire);
  assert.deepEqual(decodeOptionReplyHeader(wire), { option: 8, type: 1, length: 0 });
});

test('option reply goldens: NBD_REP_SERVER with and without a description', () => {
  const cases: { name: string; description: string; wire: Buffer }[] = [
    {
      name: 'disk',
      description: '',
      wire: hex(
        REPLY_MAGIC_HEX, // option reply magic
        '00000003', //      NBD_OPT_LIST
        '00000002', //      NBD_REP_SERVER
        '00000008', //      length 8
        '00000004', //      name length 4
        '6469736b', //      'disk'
      ),
    },
    {
      name: 'disk',
      description: 'scratch disk',
      wire: hex(
        REPLY_MAGIC_HEX, // option reply magic
        '00000003', //      NBD_OPT_LIST
        '00000002', //      NBD_REP_SERVER
        '00000014', //      length 20 = 4 + 4 + 12
        '00000004', //      name length 4
        '6469736b', //      'disk'
        '73637261746368206469736b', // 'scratch disk': the rest of the data
      ),
    },
    {
      name: '',
      description: 'scratch disk',
      wire: hex(
        REPLY_MAGIC_HEX, // option reply magic
        '00000003', //      NBD_OPT_LIST
        '00000002', //      NBD_REP_SERVER
        '00000010', //      length 16 = 4 + 0 + 12
        '00000000', //      name length 0
        '73637261746368206469736b', // 'scratch disk'
      ),
    },
  ];
  for (const { name, description, wire } of cases) {
    assertBytes(encodeOptionReply(NBD_OPT.LIST, NBD_REP.SERVER, encodeServerEntry(name, description)), wire);
    assert.deepEqual(decodeOptionReplyHeader(wire), { option: 3, type: 2, length: wire.length - 20 });
    assert.deepEqual(decodeServerEntry(wire.subarray(20)), { name, description });
  }
});

const TRANSMISSION_FLAGS =
  NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_CAN_MULTI_CONN;
// bits 0, 2, 3, 5, 6, 8: 0x0001 + 0x0004 + 0x0008 + 0x0020 + 0x0040 + 0x0100
const TRANSMISSION_FLAGS_HEX = '016d';

test('option reply goldens: each NBD_INFO_* payload inside NBD_REP_INFO', () => {
  const cases: { payload: Buffer; decoded: ReturnType<typeof decodeInfoReply>; wire: Buffer }[] = [
    {
      payload: encodeInfoExport(0x40000000, TRANSMISSION_FLAGS),
      decoded: { type: 'export', sizeBytes: 0x40000000, transmissionFlags: 0x016d },
      wire: hex(
        REPLY_MAGIC_HEX, //  option reply magic
        '00000007', //       NBD_OPT_GO
        '00000003', //       NBD_REP_INFO
        '0000000c', //       length 12: the only length NBD_INFO_EXPORT allows
        '0000', //           NBD_INFO_EXPORT
        '0000000040000000', // export size: 1 GiB
        TRANSMISSION_FLAGS_HEX, // HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|CAN_MULTI_CONN
      ),
    },
    {
      payload: encodeInfoExport(Number.MAX_SAFE_INTEGER, NBD_FLAG_HAS_FLAGS),
      decoded: { type: 'export', sizeBytes: Number.MAX_SAFE_INTEGER, transmissionFlags: 1 },
      wire: hex(
        REPLY_MAGIC_HEX, //  option reply magic
        '00000006', //       NBD_OPT_INFO
        '00000003', //       NBD_REP_INFO
        '0000000c', //       length 12
        '0000', //           NBD_INFO_EXPORT
        '001fffffffffffff', // export size 2^53-1, the largest exact one
        '0001', //           HAS_FLAGS
      ),
    },
    {
      payload: encodeInfoString(NBD_INFO.NAME, 'disk'),
      decoded: { type: 'name', name: 'disk' },
      wire: hex(
        REPLY_MAGIC_HEX, // option reply magic
        '00000007', //      NBD_OPT_GO
        '00000003', //      NBD_REP_INFO
        '00000006', //      length 6 = 2 + 4
        '0001', //          NBD_INFO_NAME
        '6469736b', //      'disk', length - 2 bytes
      ),
    },
    {
      payload: encodeInfoString(NBD_INFO.DESCRIPTION, 'scratch disk'),
      decoded: { type: 'description', description: 'scratch disk' },
      wire: hex(
        REPLY_MAGIC_HEX, // option reply magic
        '00000007', //      NBD_OPT_GO
        '00000003', //      NBD_REP_INFO
        '0000000e', //      length 14 = 2 + 12
        '0002', //          NBD_INFO_DESCRIPTION
        '73637261746368206469736b', // 'scratch disk'
      ),
    },
    {
      payload: encodeInfoBlockSize(1, 4096, 32 * 1024 * 1024),
      decoded: { type: 'block-size', minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 },
      wire: hex(
        REPLY_MAGIC_HEX, // option reply magic
        '00000007', //      NBD_OPT_GO
        '00000003', //      NBD_REP_INFO
        '0000000e', //      length 14: the only length NBD_INFO_BLOCK_SIZE allows
        '0003', //          NBD_INFO_BLOCK_SIZE
        '00000001', //      minimum block size 1
        '00001000', //      preferred block size 4096
        '02000000', //      maximum payload 32 MiB
      ),
    },
    {
      payload: encodeInfoBlockSize(512, 65536, 0xffffffff),
      decoded: { type: 'block-size', minimum: 512, preferred: 65536, maximum: 0xffffffff },
      wire: hex(
        REPLY_MAGIC_HEX, // option reply magic
        '00000007', //      NBD_OPT_GO
        '00000003', //      NBD_REP_INFO
        '0000000e', //      length 14
        '0003', //          NBD_INFO_BLOCK_SIZE
        '00000200', //      minimum 512
        '00010000', //      preferred 64 KiB
        'ffffffff', //      maximum 2^32-1
      ),
    },
  ];
  for (const { payload, decoded, wire } of cases) {
    const option = wire.readUInt32BE(8);
    assertBytes(encodeOptionReply(option, NBD_REP.INFO, payload), wire);
    assert.deepEqual(decodeOptionReplyHeader(wire), { option, type: 3, length: wire.length - 20 });
    assert.deepEqual(decodeInfoReply(wire.subarray(20)), decoded);
  }
});

test('NBD_REP_INFO of an unknown information type decodes as unknown (the client MUST ignore it)', () => {
  const payload = hex(
    '0004', //     information type 4: not defined by the spec
    'deadbeef', // opaque payload
  );
  assert.deepEqual(decodeInfoReply(payload), { type: 'unknown', info: 4 });
  assert.deepEqual(decodeInfoReply(hex('ffff')), { type: 'unknown', info: 0xffff });
});

test('option reply golden: NBD_REP_META_CONTEXT', () => {
  const wire = hex(
    REPLY_MAGIC_HEX, // option reply magic
    '0000000a', //      NBD_OPT_SET_META_CONTEXT
    '00000004', //      NBD_REP_META_CONTEXT
    '00000013', //      length 19 = 4 + 15
    '00000001', //      context id 1
    '626173653a616c6c6f636174696f6e', // 'base:allocation'
  );
  assertBytes(encodeOptionReply(NBD_OPT.SET_META_CONTEXT, NBD_REP.META_CONTEXT, encodeMetaContextReply(1, 'base:allocation')), wire);
  assert.deepEqual(decodeOptionReplyHeader(wire), { option: 10, type: 4, length: 19 });
  assert.deepEqual(decodeMetaContextReply(wire.subarray(20)), { id: 1, name: 'base:allocation' });

  const highId = hex('fffffffe', '71656d753a616c6c6f636174696f6e2d6465707468'); // id 2^32-2, 'qemu:allocation-depth'
  assertBytes(encodeMetaContextReply(0xfffffffe, 'qemu:allocation-depth'), highId);
  assert.deepEqual(decodeMetaContextReply(highId), { id: 0xfffffffe, name: 'qemu:allocation-depth' });
});

test('option reply goldens: error replies, with and without a message', () => {
  const withMessage = hex(
    REPLY_MAGIC_HEX, // option reply magic
    '00000007', //      NBD_OPT_GO
    '80000006', //      NBD_REP_ERR_UNKNOWN (2^31 + 6)
    '0000000e', //      length 14
    '6e6f2073756368206578706f7274', // 'no such export'
  );
  assertBytes(encodeOptionReply(NBD_OPT.GO, NBD_REP.ERR_UNKNOWN, 'no such export'), withMessage);
  assertBytes(encodeOptionReply(NBD_OPT.GO, NBD_REP.ERR_UNKNOWN, Buffer.from('no such export')), withMessage);
  assert.deepEqual(decodeOptionReplyHeader(withMessage), { option: 7, type: 0x80000006, length: 14 });
  assert.equal(withMessage.subarray(20).toString('utf8'), 'no such export');

  // Every error type, empty message: bit 31 set, the spec's numbering below it.
  const errors: { type: number; code: string }[] = [
    { type: NBD_REP.ERR_UNSUP, code: '80000001' },
    { type: NBD_REP.ERR_POLICY, code: '80000002' },
    { type: NBD_REP.ERR_INVALID, code: '80000003' },
    { type: NBD_REP.ERR_PLATFORM, code: '80000004' },
    { type: NBD_REP.ERR_TLS_REQD, code: '80000005' },
    { type: NBD_REP.ERR_UNKNOWN, code: '80000006' },
    { type: NBD_REP.ERR_SHUTDOWN, code: '80000007' },
    { type: NBD_REP.ERR_BLOCK_SIZE_REQD, code: '80000008' },
    { type: NBD_REP.ERR_TOO_BIG, code: '80000009' },
    { type: NBD_REP.ERR_EXT_HEADER_REQD, code: '8000000a' },
  ];
  for (const { type, code } of errors) {
    const wire = hex(
      REPLY_MAGIC_HEX, // option reply magic
      '0000000b', //      option 11 (NBD_OPT_EXTENDED_HEADERS), echoed back
      code, //            error type
      '00000000', //      no message
    );
    assertBytes(encodeOptionReply(NBD_OPT.EXTENDED_HEADERS, type), wire);
    const header = decodeOptionReplyHeader(wire);
    assert.deepEqual(header, { option: 11, type: parseInt(code, 16), length: 0 });
    assert.equal(isOptionReplyError(header.type), true);
  }
  for (const type of [1, 2, 3, 4, 0x7fffffff]) assert.equal(isOptionReplyError(type), false);
});

test('option reply header: an option number with bit 31 set is echoed unchanged', () => {
  const wire = hex(REPLY_MAGIC_HEX, 'fffffff0', '80000001', '00000000');
  assertBytes(encodeOptionReply(0xfffffff0, NBD_REP.ERR_UNSUP), wire);
  assert.deepEqual(decodeOptionReplyHeader(wire), { option: 0xfffffff0, type: 0x80000001, length: 0 });
});

// ---- NBD_OPT_EXPORT_NAME reply ----

test('NBD_OPT_EXPORT_NAME reply golden: 10 bytes with NO_ZEROES, 134 without', () => {
  const short = hex(
    '0000000040000000', // export size: 1 GiB
    TRANSMISSION_FLAGS_HEX, // transmission flags
  );
  assert.equal(short.length, 10);
  assertBytes(encodeExportNameReply(0x40000000, TRANSMISSION_FLAGS, true), short);
  assert.deepEqual(decodeExportNameReply(short), { sizeBytes: 0x40000000, transmissionFlags: 0x016d });

  const long = hex(
    '0000000040000000', // export size: 1 GiB
    TRANSMISSION_FLAGS_HEX, // transmission flags
    '00'.repeat(124), // reserved zeroes
  );
  assert.equal(long.length, 134);
  assertBytes(encodeExportNameReply(0x40000000, TRANSMISSION_FLAGS, false), long);
  assert.deepEqual(decodeExportNameReply(long), { sizeBytes: 0x40000000, transmissionFlags: 0x016d });

  const huge = hex('001fffffffffffff', '0003'); // size 2^53-1, HAS_FLAGS|READ_ONLY
  assertBytes(encodeExportNameReply(Number.MAX_SAFE_INTEGER, 3, true), huge);
  assert.deepEqual(decodeExportNameReply(huge), { sizeBytes: Number.MAX_SAFE_INTEGER, transmissionFlags: 3 });
});
