// ChunkQueue: the incoming-bytes queue every framer reads from. A stream may arrive split at
// any byte, so each operation is checked across every split of a byte sequence, then against
// a plain-array model under random splits and random interleavings of push and read.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ChunkQueue } from '../../src/protocol/chunk-queue.js';

// Values chosen so a peeked u32 exceeds 2^31 (sign trouble) and every position is distinct.
const DATA = Buffer.from([0xff, 0x80, 0x01, 0x7f, 0xfe, 0x00, 0x10, 0x25, 0x60, 0x95, 0x13]);

/** Each chunk in its own ArrayBuffer (Buffer.alloc never pools), so aliasing is observable. */
function ownChunk(bytes: Buffer): Buffer {
  const b = Buffer.alloc(bytes.length);
  bytes.copy(b);
  return b;
}

/** Every way to cut `data` into non-empty consecutive chunks: 2^(n-1) of them. */
function* allSplits(data: Buffer): Generator<Buffer[]> {
  const cuts = data.length - 1;
  for (let mask = 0; mask < 1 << cuts; mask++) {
    const parts: Buffer[] = [];
    let start = 0;
    for (let i = 0; i < cuts; i++) {
      if (mask & (1 << i)) {
        parts.push(ownChunk(data.subarray(start, i + 1)));
        start = i + 1;
      }
    }
    parts.push(ownChunk(data.subarray(start)));
    yield parts;
  }
}

function load(parts: readonly Buffer[]): ChunkQueue {
  const q = new ChunkQueue();
  for (const p of parts) q.push(p);
  return q;
}

function label(parts: readonly Buffer[]): string {
  return parts.map((p) => p.length).join('+');
}

const n = DATA.length;

test('allSplits enumerates every split', () => {
  let count = 0;
  for (const parts of allSplits(DATA)) {
    assert.equal(Buffer.concat(parts).toString('hex'), DATA.toString('hex'));
    count++;
  }
  assert.equal(count, 2 ** (n - 1));
});

test('consume(k) then consume(rest), for every k and every split', () => {
  for (const parts of allSplits(DATA)) {
    for (let k = 0; k <= n; k++) {
      const q = load(parts);
      assert.equal(q.length, n);
      assert.equal(q.consume(k).toString('hex'), DATA.subarray(0, k).toString('hex'), `${label(parts)} k=${k}`);
      assert.equal(q.length, n - k);
      assert.equal(q.consume(n - k).toString('hex'), DATA.subarray(k).toString('hex'), `${label(parts)} k=${k}`);
      assert.equal(q.length, 0);
    }
  }
});

test('consume in fixed steps of 1 to 4 bytes, for every split', () => {
  for (const parts of allSplits(DATA)) {
    for (let step = 1; step <= 4; step++) {
      const q = load(parts);
      const got: Buffer[] = [];
      while (q.length > 0) got.push(q.consume(Math.min(step, q.length)));
      assert.equal(Buffer.concat(got).toString('hex'), DATA.toString('hex'), `${label(parts)} step=${step}`);
    }
  }
});

test('copyOut(k) into a guarded buffer, then the rest, for every k and every split', () => {
  for (const parts of allSplits(DATA)) {
    for (let k = 0; k <= n; k++) {
      const q = load(parts);
      const dst = Buffer.alloc(n + 4, 0xaa);
      q.copyOut(dst, 2, k);
      assert.equal(q.length, n - k);
      q.copyOut(dst, 2 + k, n - k);
      assert.equal(q.length, 0);
      assert.equal(dst.subarray(2, 2 + n).toString('hex'), DATA.toString('hex'), `${label(parts)} k=${k}`);
      assert.deepEqual([dst[0], dst[1], dst[n + 2], dst[n + 3]], [0xaa, 0xaa, 0xaa, 0xaa], 'copyOut wrote outside its range');
    }
  }
});

test('skip(k) then consume the rest, for every k and every split; skip past the end drops what is there', () => {
  for (const parts of allSplits(DATA)) {
    for (let k = 0; k <= n; k++) {
      const q = load(parts);
      assert.equal(q.skip(k), k);
      assert.equal(q.length, n - k);
      assert.equal(q.consume(n - k).toString('hex'), DATA.subarray(k).toString('hex'), `${label(parts)} k=${k}`);
    }
    const q = load(parts);
    q.consume(3);
    assert.equal(q.skip(n + 100), n - 3);
    assert.equal(q.length, 0);
    assert.equal(q.skip(1), 0);
  }
});

test('peekU32 at every position after every consumed prefix, for every split, without consuming', () => {
  for (const parts of allSplits(DATA)) {
    for (let consumed = 0; consumed <= n; consumed++) {
      const q = load(parts);
      q.consume(consumed);
      for (let pos = 0; pos + 4 <= n - consumed; pos++) {
        assert.equal(q.peekU32(pos), DATA.readUInt32BE(consumed + pos), `${label(parts)} consumed=${consumed} pos=${pos}`);
      }
      assert.equal(q.length, n - consumed);
      assert.throws(() => q.peekU32(n - consumed - 3), RangeError);
    }
  }
});

test('consume returns a view, not a copy, when the bytes lie in one chunk', () => {
  const a = ownChunk(Buffer.from('00112233', 'hex'));
  const b = ownChunk(Buffer.from('44556677', 'hex'));
  const q = load([a, b]);

  const first = q.consume(2); // inside a
  assert.equal(first.buffer, a.buffer);
  assert.equal(first.byteOffset, a.byteOffset);
  const second = q.consume(2); // the rest of a, exactly to its end
  assert.equal(second.buffer, a.buffer);
  assert.equal(second.byteOffset, a.byteOffset + 2);
  a[3] = 0xee; // a view sees later writes to the chunk
  assert.equal(second[1], 0xee);

  const third = q.consume(3); // inside b, from its start
  assert.equal(third.buffer, b.buffer);
  assert.equal(third.byteOffset, b.byteOffset);
  assert.equal(third.toString('hex'), '445566');
});

test('consume copies when the bytes straddle chunks, and the copy is independent', () => {
  const a = ownChunk(Buffer.from('0011', 'hex'));
  const b = ownChunk(Buffer.from('2233', 'hex'));
  const q = load([a, b]);
  q.consume(1);
  const straddle = q.consume(2);
  assert.equal(straddle.toString('hex'), '1122');
  assert.notEqual(straddle.buffer, a.buffer);
  assert.notEqual(straddle.buffer, b.buffer);
  a[1] = 0xee;
  b[0] = 0xee;
  assert.equal(straddle.toString('hex'), '1122');
  assert.equal(q.consume(1).toString('hex'), '33');
});

test('refusals and edge cases', () => {
  const q = load([Buffer.from('0102', 'hex'), Buffer.alloc(0), Buffer.from('03', 'hex')]);
  assert.equal(q.length, 3); // an empty push adds nothing
  assert.throws(() => q.consume(4), RangeError);
  assert.throws(() => q.copyOut(Buffer.alloc(4), 0, 4), RangeError);
  assert.throws(() => q.peekU32(0), RangeError);
  assert.equal(q.length, 3, 'a refused read must not consume');
  assert.equal(q.consume(0).length, 0);
  assert.equal(q.consume(3).toString('hex'), '010203');
  assert.throws(() => q.consume(1), RangeError);

  const c = load([Buffer.from('0102030405', 'hex')]);
  c.consume(1);
  c.clear();
  assert.equal(c.length, 0);
  c.push(Buffer.from('aabbccdd', 'hex'));
  assert.equal(c.peekU32(0), 0xaabbccdd); // no stale head offset after clear()
  assert.equal(c.consume(4).toString('hex'), 'aabbccdd');
});

// ---- model-based, random splits and interleavings ----

type Op =
  | { readonly kind: 'push' }
  | { readonly kind: 'consume'; readonly n: number }
  | { readonly kind: 'copyOut'; readonly n: number; readonly dstPos: number }
  | { readonly kind: 'skip'; readonly n: number }
  | { readonly kind: 'peek'; readonly pos: number }
  | { readonly kind: 'overread'; readonly extra: number };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { arbitrary: fc.constant<Op>({ kind: 'push' }), weight: 3 },
  { arbitrary: fc.nat(64).map<Op>((k) => ({ kind: 'consume', n: k })), weight: 3 },
  { arbitrary: fc.tuple(fc.nat(64), fc.nat(5)).map<Op>(([k, dstPos]) => ({ kind: 'copyOut', n: k, dstPos })), weight: 2 },
  { arbitrary: fc.nat(80).map<Op>((k) => ({ kind: 'skip', n: k })), weight: 1 },
  { arbitrary: fc.nat(64).map<Op>((pos) => ({ kind: 'peek', pos })), weight: 2 },
  { arbitrary: fc.integer({ min: 1, max: 8 }).map<Op>((extra) => ({ kind: 'overread', extra })), weight: 1 },
);

/** Split `data` at the given (unsorted, possibly repeated) cut points into non-empty chunks. */
function splitAt(data: Uint8Array, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (data.length + 1)))].filter((c) => c > 0 && c < data.length).sort((x, y) => x - y);
  const parts: Buffer[] = [];
  let start = 0;
  for (const p of [...points, data.length]) {
    if (p > start) parts.push(ownChunk(Buffer.from(data.subarray(start, p))));
    start = p;
  }
  return parts;
}

test('ChunkQueue matches a flat-buffer model under random splits and interleaved operations', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 200 }), fc.array(fc.nat(), { maxLength: 30 }), fc.array(opArb, { maxLength: 60 }), (bytes, cuts, ops) => {
      const data = Buffer.from(bytes);
      const chunks = splitAt(data, cuts);
      const starts: number[] = [];
      let at = 0;
      for (const c of chunks) {
        starts.push(at);
        at += c.length;
      }

      const q = new ChunkQueue();
      let pushed = 0; // chunks pushed
      let pushedBytes = 0;
      let readPos = 0; // bytes removed from the front

      for (const op of ops) {
        const avail = pushedBytes - readPos;
        assert.equal(q.length, avail);
        switch (op.kind) {
          case 'push':
            if (pushed < chunks.length) {
              q.push(chunks[pushed]!);
              pushedBytes += chunks[pushed]!.length;
              pushed++;
            }
            break;
          case 'consume': {
            const k = op.n % (avail + 1);
            const out = q.consume(k);
            assert.equal(out.toString('hex'), data.subarray(readPos, readPos + k).toString('hex'));
            if (k > 0) {
              const i = starts.findLastIndex((s) => s <= readPos);
              const chunk = chunks[i]!;
              const inOneChunk = readPos + k <= starts[i]! + chunk.length;
              if (inOneChunk) {
                assert.equal(out.buffer, chunk.buffer, 'a read inside one chunk must be a view');
                assert.equal(out.byteOffset, chunk.byteOffset + (readPos - starts[i]!));
              } else {
                assert.ok(
                  chunks.every((c) => c.buffer !== out.buffer),
                  'a read across chunks must be a fresh copy',
                );
              }
            }
            readPos += k;
            break;
          }
          case 'copyOut': {
            const k = op.n % (avail + 1);
            const dst = Buffer.alloc(op.dstPos + k + 1, 0xaa);
            q.copyOut(dst, op.dstPos, k);
            assert.equal(dst.subarray(op.dstPos, op.dstPos + k).toString('hex'), data.subarray(readPos, readPos + k).toString('hex'));
            assert.ok(dst.subarray(0, op.dstPos).every((x) => x === 0xaa) && dst[op.dstPos + k] === 0xaa);
            readPos += k;
            break;
          }
          case 'skip': {
            const dropped = q.skip(op.n);
            assert.equal(dropped, Math.min(op.n, avail));
            readPos += dropped;
            break;
          }
          case 'peek':
            if (avail >= 4) {
              const pos = op.pos % (avail - 3);
              assert.equal(q.peekU32(pos), data.readUInt32BE(readPos + pos));
            } else {
              assert.throws(() => q.peekU32(0), RangeError);
            }
            break;
          case 'overread':
            assert.throws(() => q.consume(avail + op.extra), RangeError);
            assert.throws(() => q.copyOut(Buffer.alloc(avail + op.extra), 0, avail + op.extra), RangeError);
            break;
        }
      }
      // Whatever is left comes out intact.
      while (pushed < chunks.length) {
        q.push(chunks[pushed]!);
        pushedBytes += chunks[pushed]!.length;
        pushed++;
      }
      assert.equal(q.consume(q.length).toString('hex'), data.subarray(readPos).toString('hex'));
    }),
    { numRuns: 500 },
  );
});
