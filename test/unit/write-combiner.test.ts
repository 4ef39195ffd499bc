// The write combiner against a real file: whatever the order and adjacency of the writes, the
// file ends up as if they had been written one by one, and each promise settles only once its
// bytes are in the file.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, readSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { WriteCombiner } from '../../src/io/write-combiner.js';
import { tempDir } from '../helpers/peers.js';

test('property: writes issued in one turn land as if written in order, and are there when they resolve', async (t) => {
  const dir = tempDir(t);
  let run = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.record({ offset: fc.integer({ min: 0, max: 60_000 }), length: fc.integer({ min: 1, max: 9000 }), adjacent: fc.boolean() }), { minLength: 1, maxLength: 40 }),
      async (ops) => {
        const path = join(dir, `f${run++}`);
        const fd = openSync(path, 'w+');
        try {
          const model = Buffer.alloc(80_000);
          const combiner = new WriteCombiner(fd);
          let prevEnd = 0;
          // Non-overlapping in flight (overlapping concurrent writes have no defined order).
          const used: [number, number][] = [];
          const pending: Promise<void>[] = [];
          ops.forEach((op, i) => {
            const offset = op.adjacent ? prevEnd : op.offset;
            const end = offset + op.length;
            if (end > model.length || used.some(([a, b]) => offset < b && a < end)) return;
            used.push([offset, end]);
            prevEnd = end;
            const buf = Buffer.alloc(op.length, (i % 250) + 1);
            buf.copy(model, offset);
            pending.push(
              combiner.write(buf, offset).then(() => {
                const back = Buffer.alloc(op.length);
                readSync(fd, back, 0, op.length, offset);
                assert.ok(back.equals(buf), `write ${i} not in the file when it resolved`);
              }),
            );
          });
          await Promise.all(pending);
          const file = readFileSync(path);
          const expected = model.subarray(0, file.length);
          assert.ok(file.equals(expected));
        } finally {
          closeSync(fd);
        }
      },
    ),
    { numRuns: 60 },
  );
});

test('a failing pwritev rejects every write it carried', async (t) => {
  const dir = tempDir(t);
  const fd = openSync(join(dir, 'ro'), 'w');
  closeSync(fd);
  const ro = openSync(join(dir, 'ro'), 'r');
  t.after(() => closeSync(ro));
  const c = new WriteCombiner(ro);
  const results = await Promise.allSettled([c.write(Buffer.alloc(10, 1), 0), c.write(Buffer.alloc(10, 2), 10)]);
  assert.deepEqual(results.map((r) => r.status), ['rejected', 'rejected']);
  assert.equal((results[0] as PromiseRejectedResult).reason.code, 'EBADF');
});

test('large runs are reserved just before their pwritev, one at a time; small ones are not', async (t) => {
  const fd = openSync(join(tempDir(t), 'r'), 'w+');
  t.after(() => closeSync(fd));
  const KiB = 1024;
  // What the file holds where the other stream's run ends, when each reservation is made.
  const reserved: [number, number, number][] = [];
  const byteAt = (offset: number): number => {
    const b = Buffer.alloc(1);
    return readSync(fd, b, 0, 1, offset) === 1 ? b[0]! : -1;
  };
  const c = new WriteCombiner(fd, 1, (offset, length) => reserved.push([offset, length, byteAt(offset === 0 ? 8192 * KiB + 1024 * KiB - 1 : 1024 * KiB - 1)]));
  // Two sequential streams of 256 KiB writes (a run of 1 MiB each) and a lone 4 KiB write.
  const writes: Promise<void>[] = [c.write(Buffer.alloc(4 * KiB, 9), 4096 * KiB)];
  for (let i = 0; i < 4; i++) writes.push(c.write(Buffer.alloc(256 * KiB, 7), i * 256 * KiB), c.write(Buffer.alloc(256 * KiB, 8), 8192 * KiB + i * 256 * KiB));
  await Promise.all(writes);
  assert.deepEqual(
    reserved.map(([o, l]) => [o, l]),
    [
      [0, 1024 * KiB],
      [8192 * KiB, 1024 * KiB],
    ],
  );
  // The first run was not yet written... and was in the file before the second was reserved.
  assert.notEqual(reserved[0]![2], 8);
  assert.equal(reserved[1]![2], 7);
});
