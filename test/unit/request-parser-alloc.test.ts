import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RequestParser, type RequestMessage } from '../../src/protocol/request-parser.js';

// A write request for `length` bytes at offset 0, built from the wire layout (28 bytes).
function writeHeader(length: number): Buffer {
  return Buffer.from(`25609513 0000 0001 0000000000000007 0000000000000000 ${length.toString(16).padStart(8, '0')}`.replace(/ /g, ''), 'hex');
}

test('a payload inside one chunk is a view; one straddling chunks is assembled in the allocated buffer', () => {
  const owners: Buffer[] = [];
  const parser = new RequestParser('transmission', {
    allocPayload: (n) => {
      const b = Buffer.alloc(n + 32, 0xee);
      owners.push(b);
      return b;
    },
  });
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
