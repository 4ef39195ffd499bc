// Property tests for the NBD codec: encode→decode round trips over arbitrary field values and
// UTF-8 names, "accepted input is canonical" (whatever a decoder accepts re-encodes to the very
// same bytes), and fuzzing that decoders throw only the codec's own errors on arbitrary or
// mutated bytes. The hand-written goldens pin the layout; these cover the value space.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ProtocolError } from '../../src/errors.js';
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
} from '../../src/protocol/handshake.js';
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
} from '../../src/protocol/transmission.js';

const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const cookie = fc.bigInt({ min: 0n, max: 0xffffffffffffffffn });
const offset = fc.oneof(fc.integer({ min: 0, max: 2 ** 32 + 1 }), fc.maxSafeNat(), fc.constant(Number.MAX_SAFE_INTEGER));

/** Names whose UTF-8 form stays within the 4096-byte string limit, biased towards awkward ones. */
const wireName = fc.oneof(
  fc.string({ unit: 'binary', maxLength: 24 }),
  fc.string({ unit: 'binary', maxLength: 1024 }), // at most 4 bytes per code point
  fc.string({ unit: 'grapheme', maxLength: 200 }).filter((s) => Buffer.byteLength(s) <= 4096),
  fc.constantFrom('', '\uFEFF', '\uFEFFdisk', 'disk\uFEFF', '\u0000', 'é'.repeat(2048), '\u{10FFFF}'.repeat(1024), 'a'.repeat(4096)),
);

// ---- round trips ----

test('request round trip', () => {
  fc.assert(
    fc.property(u16, u16, cookie, offset, u32, fc.nat(16), (flags, type, c, off, length, pos) => {
      const req = { flags, type, cookie: c, offset: off, length };
      const buf = Buffer.alloc(pos + 28);
      assert.equal(encodeRequest(buf, pos, req), pos + 28);
      assert.deepEqual(decodeRequest(buf, pos), req);
    }),
  );
});

test('simple reply and structured chunk header round trips', () => {
  fc.assert(
    fc.property(u32, cookie, (error, c) => {
      const buf = Buffer.alloc(16);
      encodeSimpleReply(buf, 0, error, c);
      assert.deepEqual(decodeReplyHeader(buf), { kind: 'simple', error, cookie: c });
    }),
  );
  fc.assert(
    fc.property(u16, u16, cookie, u32, (flags, type, c, length) => {
      const buf = Buffer.alloc(20);
      encodeChunkHeader(buf, 0, flags, type, c, length);
      assert.deepEqual(decodeReplyHeader(buf), { kind: 'structured', flags, type, cookie: c, length });
    }),
  );
});

test('block status round trip', () => {
  const descriptor = fc.record({ length: fc.integer({ min: 1, max: 0xffffffff }), flags: u32 }, { noNullPrototype: true });
  fc.assert(
    fc.property(u32, fc.array(descriptor, { minLength: 1, maxLength: 64 }), (contextId, descriptors) => {
      const buf = Buffer.alloc(blockStatusPayloadSize(descriptors.length));
      assert.equal(encodeBlockStatus(buf, 0, contextId, descriptors), buf.length);
      assert.deepEqual(decodeBlockStatus(buf), { contextId, descriptors });
    }),
  );
});

test('OFFSET_HOLE and error chunk round trips', () => {
  fc.assert(
    fc.property(offset, u32, (off, length) => {
      const buf = Buffer.alloc(12);
      encodeOffsetHole(buf, 0, off, length);
      assert.deepEqual(decodeOffsetHole(buf), { offset: off, length });
    }),
  );
  fc.assert(
    fc.property(u32, fc.string({ unit: 'binary', maxLength: 1024 }), fc.option(offset, { nil: undefined }), (error, message, off) => {
      const msg = Buffer.from(message, 'utf8');
      const buf = Buffer.alloc(errorChunkSize(msg, off !== undefined));
      assert.equal(encodeErrorChunk(buf, 0, error, msg, off), buf.length);
      const type = off === undefined ? 0x8001 : 0x8002;
      assert.deepEqual(decodeErrorChunk(type, buf), off === undefined ? { error, message } : { error, message, offset: off });
    }),
  );
});

test('INFO/GO request round trip with arbitrary UTF-8 names', () => {
  fc.assert(
    fc.property(fc.constantFrom(6, 7), wireName, fc.array(u16, { maxLength: 40 }), (option, name, infos) => {
      const wire = encodeOption(option, encodeInfoRequest(name, infos));
      const header = decodeOptionHeader(wire);
      assert.deepEqual(header, { option, length: wire.length - 16 });
      assert.deepEqual(decodeInfoRequest(wire.subarray(16, 16 + header.length)), { name, infos });
    }),
  );
});

test('meta-context request round trip with arbitrary UTF-8 names and queries', () => {
  fc.assert(
    fc.property(fc.constantFrom(9, 10), wireName, fc.array(wireName, { maxLength: 6 }), (option, name, queries) => {
      const wire = encodeOption(option, encodeMetaContextRequest(name, queries));
      const header = decodeOptionHeader(wire);
      assert.deepEqual(header, { option, length: wire.length - 16 });
      assert.deepEqual(decodeMetaContextRequest(wire.subarray(16, 16 + header.length)), { name, queries });
    }),
  );
});

test('option reply round trips: server entries, info payloads, meta contexts, export name replies', () => {
  fc.assert(
    fc.property(u32, u32, wireName, wireName, (option, type, name, description) => {
      const wire = encodeOptionReply(option, type, encodeServerEntry(name, description));
      assert.deepEqual(decodeOptionReplyHeader(wire), { option, type, length: wire.length - 20 });
      assert.deepEqual(decodeServerEntry(wire.subarray(20)), { name, description });
    }),
  );
  fc.assert(
    fc.property(fc.maxSafeNat(), u16, u32, u32, u32, wireName, (size, flags, min, pref, max, name) => {
      assert.deepEqual(decodeInfoReply(encodeInfoExport(size, flags)), { type: 'export', sizeBytes: size, transmissionFlags: flags });
      assert.deepEqual(decodeInfoReply(encodeInfoBlockSize(min, pref, max)), { type: 'block-size', minimum: min, preferred: pref, maximum: max });
      assert.deepEqual(decodeInfoReply(encodeInfoString(1, name)), { type: 'name', name });
      assert.deepEqual(decodeInfoReply(encodeInfoString(2, name)), { type: 'description', description: name });
      assert.deepEqual(decodeMetaContextReply(encodeMetaContextReply(min, name)), { id: min, name });
      for (const noZeroes of [true, false]) {
        const reply = encodeExportNameReply(size, flags, noZeroes);
        assert.equal(reply.length, noZeroes ? 10 : 134);
        assert.deepEqual(decodeExportNameReply(reply), { sizeBytes: size, transmissionFlags: flags });
      }
    }),
  );
});

test('strings: encoders refuse exactly those over 4096 UTF-8 bytes', () => {
  const anyLength = fc.oneof(fc.string({ unit: 'binary', maxLength: 1400 }), fc.string({ unit: 'grapheme-ascii', minLength: 4090, maxLength: 4100 }));
  fc.assert(
    fc.property(anyLength, (s) => {
      const fits = Buffer.byteLength(s, 'utf8') <= 4096;
      const attempt = () => encodeInfoRequest(s, []);
      if (fits) assert.equal(decodeInfoRequest(attempt()).name, s);
      else assert.throws(attempt, { code: 'ERR_NBD_STRING_TOO_LONG' });
    }),
  );
});

// ---- fuzzing ----

/** The codec's own failures; anything else escaping a decoder (TypeError, RangeError, ...) is a bug. */
function assertOwnError(err: unknown): void {
  const own = err instanceof ProtocolError || err instanceof OptionDataError || err instanceof OffsetRangeError;
  assert.ok(own, `decoder threw a foreign error: ${err instanceof Error ? err.stack : String(err)}`);
}

function tryDecode<T>(decode: () => T): T | undefined {
  try {
    return decode();
  } catch (err) {
    assertOwnError(err);
    return undefined;
  }
}

const bytes = (minLength = 0, maxLength = 64) => fc.uint8Array({ minLength, maxLength }).map((a) => Buffer.from(a));

/** Variable-length payload decoders: they must bounds-check every length they read. */
const payloadDecoders: [string, (b: Buffer) => unknown][] = [
  ['decodeServerGreeting', decodeServerGreeting],
  ['decodeInfoRequest', decodeInfoRequest],
  ['decodeMetaContextRequest', decodeMetaContextRequest],
  ['decodeServerEntry', decodeServerEntry],
  ['decodeInfoReply', decodeInfoReply],
  ['decodeMetaContextReply', decodeMetaContextReply],
  ['decodeBlockStatus', decodeBlockStatus],
  ['decodeOffsetHole', decodeOffsetHole],
  ['decodeErrorChunk(ERROR)', (b) => decodeErrorChunk(0x8001, b)],
  ['decodeErrorChunk(ERROR_OFFSET)', (b) => decodeErrorChunk(0x8002, b)],
  ['decodeErrorChunk(unknown error type)', (b) => decodeErrorChunk(0xbeef, b)],
];

/**
 * Fixed-size header decoders: the layout diagrams fix their size and the framer hands them at
 * least that many bytes, so within that contract they too throw only the codec's errors.
 */
const headerDecoders: [string, number, (b: Buffer) => unknown][] = [
  ['decodeOptionHeader', 16, decodeOptionHeader],
  ['decodeOptionReplyHeader', 20, decodeOptionReplyHeader],
  ['decodeExportNameReply', 10, decodeExportNameReply],
  ['decodeRequest', 28, (b) => decodeRequest(b)],
  ['decodeReplyHeader', 20, (b) => decodeReplyHeader(b)],
];

test('payload decoders throw only codec errors on arbitrary bytes', () => {
  for (const [, decode] of payloadDecoders) {
    fc.assert(fc.property(bytes(), (b) => void tryDecode(() => decode(b))), { numRuns: 300 });
  }
});

test('header decoders throw only codec errors on arbitrary bytes of their size', () => {
  for (const [, size, decode] of headerDecoders) {
    fc.assert(fc.property(bytes(size, size + 8), (b) => void tryDecode(() => decode(b))), { numRuns: 300 });
  }
});

// Random bytes rarely get past the first length check, so also mutate valid encodings: overwrite
// a few bytes, then cut or extend. Whatever is still accepted must re-encode to the same bytes,
// which proves every length and count field was checked against the data actually present.

interface Mutation {
  readonly writes: { index: number; value: number }[];
  readonly cut: number; // bytes dropped from the end
  readonly extra: Buffer; // bytes appended after the cut
}

const mutation: fc.Arbitrary<Mutation> = fc.record({
  writes: fc.array(fc.record({ index: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }), { maxLength: 3 }),
  cut: fc.oneof(fc.constant(0), fc.nat(12)),
  extra: fc.oneof(fc.constant(Buffer.alloc(0)), bytes(1, 8)),
});

function mutate(valid: Buffer, m: Mutation): Buffer {
  const b = Buffer.from(valid);
  // Length fields sit early, so aim most writes at the first 12 bytes.
  for (const { index, value } of m.writes) if (b.length > 0) b[index % Math.min(b.length, index % 2 === 0 ? 12 : b.length)] = value;
  return Buffer.concat([b.subarray(0, Math.max(0, b.length - m.cut)), m.extra]);
}

const shortName = fc.oneof(fc.string({ unit: 'binary', maxLength: 6 }), fc.constantFrom('', 'disk', 'é'));

test('mutated INFO/GO data: rejected with OptionDataError, or accepted and canonical', () => {
  fc.assert(
    fc.property(shortName, fc.array(u16, { maxLength: 4 }), mutation, (name, infos, m) => {
      const data = mutate(encodeInfoRequest(name, infos), m);
      const decoded = tryDecode(() => decodeInfoRequest(data));
      if (decoded) assert.equal(encodeInfoRequest(decoded.name, decoded.infos).toString('hex'), data.toString('hex'));
    }),
    { numRuns: 2000 },
  );
});

test('mutated meta-context data: rejected with OptionDataError, or accepted and canonical', () => {
  fc.assert(
    fc.property(shortName, fc.array(shortName, { maxLength: 3 }), mutation, (name, queries, m) => {
      const data = mutate(encodeMetaContextRequest(name, queries), m);
      const decoded = tryDecode(() => decodeMetaContextRequest(data));
      if (decoded) assert.equal(encodeMetaContextRequest(decoded.name, decoded.queries).toString('hex'), data.toString('hex'));
    }),
    { numRuns: 2000 },
  );
});

test('mutated block status and hole payloads: rejected, or accepted and canonical', () => {
  const descriptor = fc.record({ length: fc.integer({ min: 1, max: 0xffffffff }), flags: u32 }, { noNullPrototype: true });
  fc.assert(
    fc.property(u32, fc.array(descriptor, { minLength: 1, maxLength: 3 }), mutation, (contextId, descriptors, m) => {
      const valid = Buffer.alloc(blockStatusPayloadSize(descriptors.length));
      encodeBlockStatus(valid, 0, contextId, descriptors);
      const data = mutate(valid, m);
      const decoded = tryDecode(() => decodeBlockStatus(data));
      if (decoded) {
        const again = Buffer.alloc(blockStatusPayloadSize(decoded.descriptors.length));
        encodeBlockStatus(again, 0, decoded.contextId, decoded.descriptors);
        assert.equal(again.toString('hex'), data.toString('hex'));
      }
    }),
    { numRuns: 1000 },
  );
  fc.assert(
    fc.property(offset, u32, mutation, (off, length, m) => {
      const valid = Buffer.alloc(12);
      encodeOffsetHole(valid, 0, off, length);
      const data = mutate(valid, m);
      const decoded = tryDecode(() => decodeOffsetHole(data));
      if (decoded) {
        const again = Buffer.alloc(12);
        encodeOffsetHole(again, 0, decoded.offset, decoded.length);
        assert.equal(again.toString('hex'), data.toString('hex'));
      }
    }),
    { numRuns: 1000 },
  );
});

test('mutated error chunks and option reply payloads throw only codec errors', () => {
  fc.assert(
    fc.property(u32, shortName, fc.option(offset, { nil: undefined }), mutation, (error, message, off, m) => {
      const msg = Buffer.from(message, 'utf8');
      const valid = Buffer.alloc(errorChunkSize(msg, off !== undefined));
      encodeErrorChunk(valid, 0, error, msg, off);
      const data = mutate(valid, m);
      tryDecode(() => decodeErrorChunk(0x8001, data));
      tryDecode(() => decodeErrorChunk(0x8002, data));
    }),
    { numRuns: 1000 },
  );
  fc.assert(
    fc.property(shortName, shortName, fc.maxSafeNat(), u16, mutation, (name, description, size, flags, m) => {
      tryDecode(() => decodeServerEntry(mutate(encodeServerEntry(name, description), m)));
      tryDecode(() => decodeInfoReply(mutate(encodeInfoExport(size, flags), m)));
      tryDecode(() => decodeInfoReply(mutate(encodeInfoBlockSize(flags, size % 2 ** 32, flags), m)));
      tryDecode(() => decodeMetaContextReply(mutate(encodeMetaContextReply(flags, name), m)));
    }),
    { numRuns: 1000 },
  );
});
