// When replies leave (server/replies.ts): those completed in one turn of the event loop go to
// the socket in one writev at the end of the turn, while a reply that cannot have company goes
// at once. Observed on a Writable that records each write(v) it is handed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { BufferPool } from '../../src/server/buffer-pool.js';
import { ReplyWriter } from '../../src/server/replies.js';

/** Each element: the replies (16 bytes each) one write or writev carried. */
function recordingSocket(): { out: Writable; calls: number[] } {
  const calls: number[] = [];
  const out = new Writable({
    write(chunk: Buffer, _enc, cb) {
      calls.push(chunk.length / 16);
      cb();
    },
    writev(chunks, cb) {
      calls.push(chunks.reduce((n, c) => n + (c.chunk as Buffer).length, 0) / 16);
      cb();
    },
  });
  return { out, calls };
}

const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

test('replies of one turn leave together at its end', async () => {
  const { out, calls } = recordingSocket();
  const replies = new ReplyWriter(out, new BufferPool());
  replies.simpleOk(1n);
  replies.simpleOk(2n);
  replies.simpleOk(3n);
  assert.deepEqual(calls, [], 'nothing leaves before the end of the turn');
  await nextTurn();
  assert.deepEqual(calls, [3]);
});

test('a reply that cannot have company leaves at once; one that can still waits for the turn to end', async () => {
  const { out, calls } = recordingSocket();
  let alone = true;
  const replies = new ReplyWriter(out, new BufferPool(), () => alone);
  replies.simpleOk(1n);
  assert.deepEqual(calls, [1], 'written in the same tick');
  alone = false;
  replies.simpleOk(2n);
  replies.simpleOk(3n);
  assert.deepEqual(calls, [1]);
  await nextTurn();
  assert.deepEqual(calls, [1, 2]);
});
