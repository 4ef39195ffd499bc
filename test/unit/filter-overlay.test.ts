// The copy-on-write overlay against a plain in-memory model: random reads, writes, zeroes
// and trims (also concurrent ones sharing granules) must read back exactly like the model,
// and the base device must never be written.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { closeSync, openSync, readdirSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { Backend } from '../../src/block/backend.js';
import { EXTENT_ZERO, type BlockDevice } from '../../src/block/device.js';
import { openOverlay } from '../../src/block/filters/overlay.js';
import { UsageError } from '../../src/errors.js';
import { openRaw } from '../../src/formats/raw/driver.js';
import { tempDir } from '../helpers/peers.js';
import { MemoryDevice } from './backend-memory-device.js';

type Op =
  | { kind: 'read'; offset: number; length: number }
  | { kind: 'write'; offset: number; length: number; seed: number }
  | { kind: 'zero'; offset: number; length: number; mayTrim: boolean }
  | { kind: 'trim'; offset: number; length: number };

/** The reference: bytes, plus which bytes are defined (a trim leaves its range unspecified). */
class Model {
  readonly bytes: Buffer;
  readonly defined: Uint8Array;
  constructor(base: Buffer) {
    this.bytes = Buffer.from(base);
    this.defined = new Uint8Array(base.length).fill(1);
  }
  apply(op: Op): void {
    const end = op.offset + op.length;
    if (op.kind === 'write') {
      payload(op.length, op.seed).copy(this.bytes, op.offset);
      this.defined.fill(1, op.offset, end);
    } else if (op.kind === 'zero') {
      this.bytes.fill(0, op.offset, end);
      this.defined.fill(1, op.offset, end);
    } else if (op.kind === 'trim') {
      // "a client MUST NOT make any assumptions about the contents of the export affected by
      // this command, until overwriting it again"
      this.defined.fill(0, op.offset, end);
    }
  }
  check(got: Buffer, offset: number, what: string): void {
    for (let i = 0; i < got.length; i++) {
      if (this.defined[offset + i] && got[i] !== this.bytes[offset + i]) {
        assert.fail(`${what}: byte ${offset + i} is ${got[i]}, model says ${this.bytes[offset + i]}`);
      }
    }
  }
}

function payload(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = ((seed + i * 7) % 251) + 1;
  return b;
}

function basePattern(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 13 + 5) & 0xff;
  return b;
}

async function run(dev: BlockDevice, op: Op, model: Model): Promise<void> {
  switch (op.kind) {
    case 'read': {
      const got = Buffer.alloc(op.length);
      await dev.pread(got, op.offset);
      model.check(got, op.offset, `read ${op.offset}+${op.length}`);
      return;
    }
    case 'write':
      return dev.pwrite!(payload(op.length, op.seed), op.offset);
    case 'zero':
      return dev.zero!(op.offset, op.length, { mayTrim: op.mayTrim });
    case 'trim':
      return dev.trim!(op.offset, op.length);
  }
}

function opArb(size: number): fc.Arbitrary<Op> {
  const range = fc
    .tuple(fc.integer({ min: 0, max: size - 1 }), fc.integer({ min: 1, max: Math.min(size, 9000) }))
    .map(([offset, length]) => ({ offset, length: Math.min(length, size - offset) }));
  return fc.oneof(
    range.map((r) => ({ kind: 'read' as const, ...r })),
    fc.tuple(range, fc.nat(250)).map(([r, seed]) => ({ kind: 'write' as const, ...r, seed })),
    fc.tuple(range, fc.boolean()).map(([r, mayTrim]) => ({ kind: 'zero' as const, ...r, mayTrim })),
    range.map((r) => ({ kind: 'trim' as const, ...r })),
  );
}

async function checkWhole(dev: BlockDevice, model: Model): Promise<void> {
  const all = Buffer.alloc(dev.sizeBytes);
  await dev.pread(all, 0);
  model.check(all, 0, 'whole-device read');
  // Extents are contiguous, cover the device, and a ZERO extent really reads as zeros.
  const ext = await dev.extents!(0, dev.sizeBytes);
  let pos = 0;
  for (const x of ext) {
    assert.ok(x.length > 0);
    if (x.flags & EXTENT_ZERO) assert.ok(all.subarray(pos, pos + x.length).every((b) => b === 0), `ZERO extent at ${pos} reads as zeros`);
    pos += x.length;
  }
  assert.equal(pos, dev.sizeBytes);
}

const SIZES = [512 * 37 + 100, 4096 * 9];
const GRANULES = [512, 4096];

test('overlay reads exactly like the model after random sequential operations; the base is untouched', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.constantFrom(...SIZES).chain((size) => fc.tuple(fc.constant(size), fc.constantFrom(...GRANULES), fc.array(opArb(size), { maxLength: 40 }))),
      async ([size, granule, ops]) => {
        const original = basePattern(size);
        const base = new MemoryDevice(Buffer.from(original));
        const dev = await openOverlay(base, { granuleBytes: granule });
        try {
          const model = new Model(original);
          for (const op of ops) {
            await run(dev, op, model);
            model.apply(op);
          }
          await checkWhole(dev, model);
          assert.deepEqual(base.data, original, 'base bytes unchanged');
          assert.deepEqual(base.calls.filter((c) => !c.startsWith('pread') && !c.startsWith('extents')), [], 'base only read');
        } finally {
          await dev.close();
        }
      },
    ),
    { numRuns: 150 },
  );
});

test('concurrent writes and zeroes to disjoint bytes sharing granules all land', async () => {
  const size = 4096 * 8;
  // Disjoint ranges: cut the device at random points and keep a random subset of the pieces.
  const batch = fc
    .uniqueArray(fc.integer({ min: 1, max: size - 1 }), { minLength: 2, maxLength: 40 })
    .chain((cuts) => {
      const points = [0, ...cuts.sort((a, b) => a - b), size];
      const pieces = points.slice(1).map((end, i) => ({ offset: points[i]!, length: end - points[i]! }));
      return fc.tuple(...pieces.map((p) => fc.oneof(
        fc.constant(null),
        fc.nat(250).map((seed) => ({ kind: 'write' as const, ...p, seed })),
        fc.boolean().map((mayTrim) => ({ kind: 'zero' as const, ...p, mayTrim })),
      )));
    })
    .map((ops) => (ops as Array<Op | null>).filter((o): o is Op => o !== null));
  await fc.assert(
    fc.asyncProperty(fc.constantFrom(512, 4096), batch, batch, async (granule, first, second) => {
      const original = basePattern(size);
      const base = new MemoryDevice(Buffer.from(original));
      const dev = await openOverlay(base, { granuleBytes: granule });
      try {
        const model = new Model(original);
        for (const ops of [first, second]) {
          await Promise.all(ops.map((op) => run(dev, op, model)));
          for (const op of ops) model.apply(op);
        }
        await checkWhole(dev, model);
        assert.deepEqual(base.data, original);
      } finally {
        await dev.close();
      }
    }),
    { numRuns: 100 },
  );
});

test('overlay over a raw file: writes are visible, the file is unchanged, no temporary file is left', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'base.raw');
  const fd = openSync(path, 'w');
  writeSync(fd, basePattern(1 << 20));
  closeSync(fd);
  const digest = createHash('sha256').update(readFileSync(path)).digest('hex');
  const overlayDir = join(dir, 'ov');
  const { mkdirSync } = await import('node:fs');
  mkdirSync(overlayDir);
  const raw = await openRaw(path, { readOnly: true });
  const dev = new Backend(await openOverlay(raw, { dir: overlayDir }));
  assert.deepEqual(readdirSync(overlayDir), [], 'the temporary file is unlinked at once');
  assert.equal(dev.capabilities().writable, true);
  await dev.pwrite(Buffer.alloc(100, 0xcc), 70_000, { fua: true });
  await dev.zero(0, 65536, { mayTrim: true });
  await dev.flush();
  const got = Buffer.alloc(200_000);
  await dev.pread(got, 0);
  const expect = basePattern(1 << 20).subarray(0, 200_000);
  expect.fill(0, 0, 65536);
  expect.fill(0xcc, 70_000, 70_100);
  assert.deepEqual(got, expect);
  const ext = await dev.extents(0, 1 << 20);
  assert.deepEqual(ext[0], { length: 65536, flags: 3 }, 'the zeroed granule reports as a hole');
  await dev.close();
  assert.equal(createHash('sha256').update(readFileSync(path)).digest('hex'), digest, 'base file unchanged');
});

test('a bad granule is a usage error', async () => {
  await assert.rejects(openOverlay(new MemoryDevice(4096), { granuleBytes: 1000 }), UsageError);
  await assert.rejects(openOverlay(new MemoryDevice(4096), { granuleBytes: 256 }), UsageError);
  await assert.rejects(openOverlay(new MemoryDevice(4096, { sizes: { minimum: 4096 } }), { granuleBytes: 512 }), UsageError);
});

test('overlay extents: base extents where untouched, overlay state where written, REQ_ONE gives one', async () => {
  const size = 16 * 4096;
  const base = new MemoryDevice(size, {
    extents: (offset, length) => [{ length: Math.min(length, size - offset), flags: 3 }],
  });
  const dev = await openOverlay(base, { granuleBytes: 4096 });
  try {
    await dev.pwrite!(Buffer.alloc(100, 1), 4096 * 2 + 10);
    await dev.zero!(4096 * 5, 4096, { mayTrim: true });
    const ext = await dev.extents!(0, size);
    // Untouched base holes, the copied-up granule (data), and the zeroed granule (a hole in the
    // overlay file) next to base holes merge into runs.
    assert.deepEqual(ext, [
      { length: 4096 * 2, flags: 3 },
      { length: 4096, flags: 0 },
      { length: size - 4096 * 3, flags: 3 },
    ]);
    assert.deepEqual(await dev.extents!(4096 * 2 + 5, size - 4096 * 2 - 5, { one: true }), [{ length: 4096 - 5, flags: 0 }]);
  } finally {
    await dev.close();
  }
  assert.equal(base.closed, 1, 'closing the overlay closes the base');
});
