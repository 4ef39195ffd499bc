// The shared transfer loop and its job planner, on in-memory devices: jobs tile the range
// exactly, data jobs are grain-aligned (so no two workers write one grain), and a transfer
// reproduces the source whatever the extents, grain, worker count and target state; zero
// detection against a naive scan.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { EXTENT_HOLE, EXTENT_ZERO, type Extent } from '../../src/block/device.js';
import { deviceTarget, planJobs, transfer, type TransferJob } from '../../src/image/transfer.js';
import { isAllZero, zeroRuns } from '../../src/image/zero.js';
import { MemoryDevice } from './backend-memory-device.js';

interface Seg {
  readonly length: number;
  readonly kind: 'data' | 'zero' | 'hole' | 'zerodata';
}

const segArb = fc.record({ length: fc.integer({ min: 1, max: 40_000 }), kind: fc.constantFrom('data' as const, 'zero' as const, 'hole' as const, 'zerodata' as const) });

/** A source device whose extents are `segs`, data segments random (or zero for 'zerodata'). */
function sourceFor(segs: readonly Seg[], seed: number): MemoryDevice {
  const size = segs.reduce((n, s) => n + s.length, 0);
  const data = Buffer.alloc(size);
  let x = seed >>> 0 || 1;
  let pos = 0;
  for (const s of segs) {
    if (s.kind === 'data') {
      for (let i = pos; i < pos + s.length; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        data[i] = x & 0xff || 1;
      }
    }
    pos += s.length;
  }
  const extents = (offset: number, length: number): Extent[] => {
    const out: Extent[] = [];
    let p = 0;
    for (const s of segs) {
      const a = Math.max(p, offset);
      const b = Math.min(p + s.length, offset + length);
      if (b > a) out.push({ length: b - a, flags: s.kind === 'zero' ? EXTENT_ZERO : s.kind === 'hole' ? EXTENT_HOLE | EXTENT_ZERO : 0 });
      p += s.length;
    }
    return out;
  };
  return new MemoryDevice(data, { extents });
}

test('planJobs tiles [start, end) in order; data jobs are grain-aligned; every data byte is in a data job', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(segArb, { minLength: 1, maxLength: 12 }), fc.constantFrom(512, 4096, 65536), fc.integer({ min: 1, max: 4 }), async (segs, grain, reqGrains) => {
      const src = sourceFor(segs, 7);
      const jobs: TransferJob[] = [];
      for await (const j of planJobs(src, 0, src.sizeBytes, grain * reqGrains, grain)) jobs.push(j);
      let pos = 0;
      for (const j of jobs) {
        assert.equal(j.offset, pos, 'jobs are contiguous and ordered');
        assert.ok(j.length > 0);
        if (!j.zero) {
          assert.equal(j.offset % grain, 0, 'data jobs start on a grain');
          assert.ok((j.offset + j.length) % grain === 0 || j.offset + j.length === src.sizeBytes, 'data jobs end on a grain or at the end');
          assert.ok(j.length <= grain * reqGrains);
        }
        pos += j.length;
      }
      assert.equal(pos, src.sizeBytes);
      let p = 0;
      for (const s of segs) {
        if (s.kind === 'data') {
          for (const probe of [p, p + s.length - 1]) assert.ok(jobs.some((j) => !j.zero && j.offset <= probe && probe < j.offset + j.length), `data byte ${probe}`);
        }
        p += s.length;
      }
    }),
    { numRuns: 300 },
  );
});

test('transfer reproduces the source on a zeroed or a dirty target, with any workers and grain', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(segArb, { minLength: 1, maxLength: 10 }),
      fc.constantFrom(512, 4096, 16384),
      fc.integer({ min: 1, max: 6 }),
      fc.boolean(),
      fc.integer(),
      async (segs, grain, workers, dirty, seed) => {
        const src = sourceFor(segs, seed);
        const dst = new MemoryDevice(src.sizeBytes);
        if (dirty) dst.data.fill(0xaa);
        const stats = await transfer({ sources: [src], targets: [deviceTarget(dst)], requestBytes: grain * 3, workers, grainBytes: grain, targetZeroed: !dirty });
        assert.ok(dst.data.equals(src.data));
        const dataBytes = segs.filter((s) => s.kind === 'data').reduce((n, s) => n + s.length, 0);
        assert.ok(stats.writtenBytes >= dataBytes, 'every data byte written');
        if (!dirty) assert.equal(stats.zeroedBytes, 0, 'a zeroed target is never zeroed again');
        // All-zero data ('zerodata') never reaches pwrite on a fresh target.
        if (!dirty && dataBytes === 0) assert.ok(!dst.calls.some((c) => c.startsWith('pwrite')));
      },
    ),
    { numRuns: 200 },
  );
});

test('transfer with onlyDifferences writes just the grains that differ', async () => {
  const grain = 4096;
  const src = new MemoryDevice(Buffer.alloc(64 * 1024, 1), {});
  const dst = new MemoryDevice(Buffer.alloc(64 * 1024, 1), {});
  dst.data.fill(2, 8192, 8192 + 100);
  src.data.fill(0, 40_000, 50_000);
  await transfer({ sources: [src], targets: [deviceTarget(dst)], requestBytes: 16384, workers: 2, grainBytes: grain, targetZeroed: false, onlyDifferences: true });
  assert.ok(dst.data.equals(src.data));
  const writes = dst.calls.filter((c) => c.startsWith('pwrite') || c.startsWith('zero'));
  assert.deepEqual(writes.sort(), ['pwrite 36864 4096', 'pwrite 49152 4096', 'pwrite 8192 4096', 'zero 40960 8192 trim'].sort());
});

test('isAllZero and zeroRuns agree with a byte scan, at any alignment', () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 0, maxLength: 300 }), fc.integer({ min: 0, max: 7 }), fc.integer({ min: 1, max: 64 }), (bytes, shift, grain) => {
      const backing = Buffer.alloc(bytes.length + 8);
      const buf = backing.subarray(shift, shift + bytes.length);
      // Mostly zeros, so that both answers occur.
      for (let i = 0; i < bytes.length; i++) buf[i] = bytes[i]! < 240 ? 0 : bytes[i]!;
      assert.equal(isAllZero(buf), buf.every((b) => b === 0));
      const runs = zeroRuns(buf, grain);
      let pos = 0;
      for (const [a, b, zero] of runs) {
        assert.equal(a, pos);
        for (let g = a; g < b; g += grain) assert.equal(buf.subarray(g, Math.min(b, g + grain)).every((x) => x === 0), zero);
        pos = b;
      }
      assert.equal(pos, buf.length);
    }),
  );
});

test('transfer with onlyDifferences reproduces the source over any prior target content', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(segArb, { minLength: 1, maxLength: 8 }), fc.constantFrom(512, 4096), fc.integer(), fc.integer(), async (segs, grain, s1, s2) => {
      const src = sourceFor(segs, s1);
      const old = sourceFor(segs.map((s, i) => ({ ...s, kind: i % 2 ? s.kind : 'data' })), s2);
      const dst = new MemoryDevice(Buffer.from(old.data));
      // Half the grains already hold the source's bytes: those must not be written.
      for (let g = 0; g < src.sizeBytes; g += 2 * grain) src.data.copy(dst.data, g, g, Math.min(src.sizeBytes, g + grain));
      const before = Buffer.from(dst.data);
      await transfer({ sources: [src], targets: [deviceTarget(dst)], requestBytes: grain * 4, workers: 3, grainBytes: grain, targetZeroed: false, onlyDifferences: true });
      assert.ok(dst.data.equals(src.data));
      for (const c of dst.calls.filter((x) => x.startsWith('pwrite') || x.startsWith('zero'))) {
        const [, off, len] = c.split(' ').map(Number) as [number, number, number];
        assert.ok(!before.subarray(off, off + len).equals(src.data.subarray(off, off + len)), `${c} rewrote identical bytes`);
      }
    }),
    { numRuns: 150 },
  );
});

test('zeroRuns over requests of many grains: long zero stretches and scattered data, any grain', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 0, max: 300 * 1024 }),
      fc.array(fc.integer({ min: 0, max: 300 * 1024 }), { maxLength: 6 }),
      fc.constantFrom(512, 3000, 4096, 65536, 131072),
      fc.integer({ min: 0, max: 3 }),
      (length, nonzero, grain, shift) => {
        const buf = Buffer.alloc(length + 4).subarray(shift, shift + length);
        for (const at of nonzero) if (at < length) buf[at] = 1;
        const runs = zeroRuns(buf, grain);
        let pos = 0;
        for (const [a, b, zero] of runs) {
          assert.equal(a, pos);
          assert.ok(b > a);
          for (let g = a; g < b; g += grain) assert.equal(buf.subarray(g, Math.min(b, g + grain)).every((x) => x === 0), zero, `grain at ${g}`);
          pos = b;
        }
        assert.equal(pos, length);
        runs.forEach(([, , zero], i) => i === 0 || assert.notEqual(zero, runs[i - 1]![2], 'neighbours are coalesced'));
      },
    ),
    { numRuns: 200 },
  );
});
