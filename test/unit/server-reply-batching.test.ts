// When replies leave (server/replies.ts): those completed in one turn of the event loop go to
// the socket in one writev at the end of the turn, while a reply that cannot have company goes
// at once. Observed on a Writable that records each write(v) it is handed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readSync } from 'node:fs';
import { Writable } from 'node:stream';
import { BufferPool } from '../../src/server/buffer-pool.js';
import { ReplyWriter } from '../../src/server/replies.js';
import { closeFd, socketPair } from '../../src/sys/socket.js';

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

test('a spliced write\'s reply goes straight to the socket when nothing is queued, else behind what is', async (t) => {
  const [ours, theirs] = socketPair();
  t.after(() => {
    closeFd(ours);
    closeFd(theirs);
  });
  const { out, calls } = recordingSocket();
  const replies = new ReplyWriter(out, new BufferPool());
  replies.simpleOkNow(5n, ours);
  assert.deepEqual(calls, [], 'the stream is not used');
  const got = Buffer.alloc(64);
  assert.equal(readSync(theirs, got, 0, 64, null), 16);
  assert.equal(got.readUInt32BE(0), 0x67446698);
  assert.equal(got.readUInt32BE(4), 0);
  assert.equal(got.readBigUInt64BE(8), 5n);

  // Something waits in the stream: the reply must not overtake it.
  out.cork();
  out.write(Buffer.alloc(16));
  replies.simpleOkNow(6n, ours);
  out.uncork();
  await nextTurn();
  assert.deepEqual(calls, [2], 'both left through the stream, in order');

  // No socket to send to (TLS): the stream, as simpleOk.
  replies.simpleOkNow(7n, -1);
  await nextTurn();
  assert.deepEqual(calls, [2, 1]);
});
