import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { RequestParser, type ClientMessage, type RequestMessage } from '../../src/protocol/request-parser.js';

// A write request for `length` bytes, built from the wire layout (28 bytes).
function writeHeader(length: number, cookie = 7, offset = 0): Buffer {
  const hex = (v: number, digits: number): string => v.toString(16).padStart(digits, '0');
  return Buffer.from(`25609513 0000 0001 ${hex(cookie, 16)} ${hex(offset, 16)} ${hex(length, 8)}`.replace(/ /g, ''), 'hex');
}

/** An allocPayload that records what it hands out. */
function recordingAlloc(): { owners: Buffer[]; allocPayload: (n: number) => Buffer } {
  const owners: Buffer[] = [];
  return {
    owners,
    allocPayload: (n) => {
      const b = Buffer.alloc(n + 32, 0xee);
      owners.push(b);
      return b;
    },
  };
}

test('a payload inside one chunk is a view; one straddling chunks is assembled in the allocated buffer', () => {
  const { owners, allocPayload } = recordingAlloc();
  const parser = new RequestParser('transmission', { allocPayload });
  const payload = Buffer.from('0123456789abcdef');
  const chunk = Buffer.concat([writeHeader(16), payload]);
  parser.push(chunk);
  const a = parser.next() as RequestMessage;
  assert.deepEqual(a.payload, payload);
  assert.equal(a.payloadOwner, undefined);
  assert.equal(a.payload!.buffer, chunk.buffer, 'a view into the pushed chunk');
  assert.equal(owners.length, 0);

  parser.push(writeHeader(16));
  parser.push(payload.subarray(0, 5));
  assert.equal(parser.next(), null);
  parser.push(payload.subarray(5));
  const b = parser.next() as RequestMessage;
  assert.deepEqual(b.payload, payload);
  assert.equal(owners.length, 1);
  assert.equal(b.payloadOwner, owners[0]);
  assert.equal(b.payload!.buffer, owners[0]!.buffer, 'assembled in the allocated buffer');
  assert.equal(b.cookie, 7n);
});

test('property: large payloads filled in place, by pushes and by reads into fillTarget, come out whole', () => {
  fc.assert(
    fc.property(
      fc.array(fc.record({ length: fc.integer({ min: 1, max: 300_000 }), seed: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 6 }),
      fc.array(fc.integer({ min: 1, max: 200_000 }), { minLength: 1, maxLength: 40 }),
      fc.array(fc.boolean(), { minLength: 1, maxLength: 40 }),
      (writes, cuts, useTarget) => {
        const payloads = writes.map((w) => Buffer.alloc(w.length, w.seed));
        const stream = Buffer.concat(writes.flatMap((w, i) => [writeHeader(w.length, i + 1, i * 4096), payloads[i]!]));
        const { owners, allocPayload } = recordingAlloc();
        const p = new RequestParser('transmission', { allocPayload, fillInPlaceMinBytes: 65536 });
        const out: ClientMessage[] = [];
        const drain = (): void => {
          for (let m = p.next(); m !== null; m = p.next()) out.push(m);
        };
        let pos = 0;
        for (let i = 0; pos < stream.length; i++) {
          const target = useTarget[i % useTarget.length] ? p.fillTarget() : null;
          if (target !== null) {
            // The socket reads straight into the payload: at most what is left of it.
            const n = Math.min(cuts[i % cuts.length]!, target.length, stream.length - pos);
            stream.copy(target, 0, pos, pos + n);
            p.filled(n);
            pos += n;
          } else {
            const n = Math.min(cuts[i % cuts.length]!, p.nextReadBytes(65536), stream.length - pos);
            p.push(Buffer.from(stream.subarray(pos, pos + n)));
            pos += n;
          }
          drain();
        }
        assert.equal(out.length, writes.length);
        out.forEach((m, i) => {
          assert.equal(m.kind, 'request');
          const r = m as Extract<ClientMessage, { kind: 'request' }>;
          assert.equal(r.cookie, BigInt(i + 1));
          assert.ok(r.payload!.equals(payloads[i]!), `payload ${i}`);
          // Filled payloads live in a buffer from allocPayload, handed back with the message.
          if (writes[i]!.length >= 65536) assert.ok(r.payloadOwner !== undefined && owners.includes(r.payloadOwner));
        });
        assert.equal(p.fillTarget(), null);
        assert.ok(p.idle);
      },
    ),
    { numRuns: 200 },
  );
});

test('filled() past the payload being filled is refused', () => {
  const p = new RequestParser('transmission', { allocPayload: (n) => Buffer.alloc(n), fillInPlaceMinBytes: 1024 });
  p.push(writeHeader(4096, 1, 0));
  assert.equal(p.next(), null);
  assert.equal(p.fillTarget()!.length, 4096);
  assert.throws(() => p.filled(4097), RangeError);
  p.filled(4096);
  assert.equal(p.next()?.kind, 'request');
  // After a large write the next read is sized for a header, so its payload can be read in place.
  assert.equal(p.nextReadBytes(65536), 28);
});

test('property: payloads the consumer takes come out whole, with the messages around them intact', () => {
  fc.assert(
    fc.property(
      fc.array(fc.record({ length: fc.integer({ min: 0, max: 200_000 }), seed: fc.integer({ min: 0, max: 255 }), take: fc.boolean() }), { minLength: 1, maxLength: 6 }),
      fc.array(fc.integer({ min: 1, max: 150_000 }), { minLength: 1, maxLength: 40 }),
      (writes, cuts) => {
        const payloads = writes.map((w) => Buffer.alloc(w.length, w.seed));
        const stream = Buffer.concat(writes.flatMap((w, i) => [writeHeader(w.length, i + 1, i * 4096), payloads[i]!]));
        const asked: number[] = [];
        const p = new RequestParser('transmission', {
          allocPayload: (n) => Buffer.alloc(n),
          fillInPlaceMinBytes: 65536,
          takePayload: (offset) => {
            asked.push(offset / 4096);
            return writes[offset / 4096]!.take;
          },
        });
        const got: Buffer[] = [];
        let pos = 0;
        let cut = 0;
        const nextCut = (): number => cuts[cut++ % cuts.length]!;
        while (pos < stream.length) {
          const n = Math.min(nextCut(), p.nextReadBytes(65536), stream.length - pos);
          p.push(Buffer.from(stream.subarray(pos, pos + n)));
          pos += n;
          for (let m = p.next(); m !== null; m = p.next()) {
            const r = m as RequestMessage;
            if (r.taken === undefined) {
              got.push(Buffer.from(r.payload!));
              continue;
            }
            // The consumer reads the rest of the payload from the stream itself, in pieces.
            const rest = r.length - r.taken.length;
            assert.ok(rest > 0, 'taken only while some of the payload is still to come');
            const parts = [Buffer.from(r.taken)];
            for (let left = rest; left > 0; ) {
              const k = Math.min(nextCut(), left);
              parts.push(Buffer.from(stream.subarray(pos, pos + k)));
              pos += k;
              left -= k;
            }
            got.push(Buffer.concat(parts));
          }
        }
        assert.equal(got.length, writes.length);
        got.forEach((g, i) => assert.ok(g.equals(payloads[i]!), `payload ${i}`));
        // Asked only about writes whose payload had not all arrived; never about empty ones.
        for (const i of asked) assert.ok(writes[i]!.length > 0);
        assert.ok(p.idle);
      },
    ),
    { numRuns: 300 },
  );
});

test('a taken write read with nothing of its payload hands out no view: the read buffer may be reused', () => {
  const p = new RequestParser('transmission', { allocPayload: (n) => Buffer.alloc(n), takePayload: () => true });
  const before = p.viewsOut;
  p.push(writeHeader(262_144));
  const alone = p.next() as RequestMessage;
  assert.equal(alone.taken!.length, 0);
  assert.equal(p.viewsOut, before, 'a header read alone leaves its buffer free');
  p.push(Buffer.concat([writeHeader(262_144, 8), Buffer.alloc(100, 1)]));
  const withBytes = p.next() as RequestMessage;
  assert.equal(withBytes.taken!.length, 100);
  assert.equal(p.viewsOut, before + 1, 'payload bytes handed out are a view into the read buffer');
});
