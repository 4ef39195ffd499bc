// The run scanners that map long stretches of a standard L2 table at once: each must take exactly
// the entries that decodeL2Entry decodes, one at a time, to host-contiguous plain data (or to
// nothing at all: an entry of zero bits), and stop at the first other, so that entry's checks and errors stay the decoder's.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { decodeL2Entry, makeGeometry, scanDataRun, scanUnallocatedRun, type Qcow2Geometry } from '../../src/formats/qcow2/map.js';

const CS = 65536;
const FILE_END = 64 * CS;

/** One L2 entry as [hi, lo]: data (next to the one before, or anywhere), zero, compressed, or broken. */
const entryArb = fc.oneof(
  fc.constant<[number, number] | 'next'>('next'),
  fc.constant<[number, number]>([0, 0]),
  fc.integer({ min: 0, max: 70 }).map((c): [number, number] => [0x80000000, (c * CS) >>> 0]),
  fc.integer({ min: 0, max: 70 }).map((c): [number, number] => [0, ((c * CS) | 1) >>> 0]),
  fc.integer({ min: 1, max: 63 }).map((c): [number, number] => [0x40000000, (c * CS) >>> 0]),
  fc.integer({ min: 1, max: 63 }).map((c): [number, number] => [0x01000000, (c * CS) >>> 0]),
  fc.integer({ min: 1, max: 63 }).map((c): [number, number] => [0, (c * CS + 512) >>> 0]),
  fc.integer({ min: 1, max: 63 }).map((c): [number, number] => [0, (c * CS + 2) >>> 0]),
);

function table(entries: readonly ([number, number] | 'next')[]): Buffer {
  const buf = Buffer.alloc(entries.length * 8);
  let prev = 0;
  entries.forEach((e, i) => {
    const [hi, lo] = e === 'next' ? [0, (prev + CS) >>> 0] : e;
    buf.writeUInt32BE(hi >>> 0, i * 8);
    buf.writeUInt32BE(lo >>> 0, i * 8 + 4);
    prev = lo & ~0x1ff;
  });
  return buf;
}

/** The entries from `index` on that the decoder maps to host-contiguous plain data. */
function referenceDataRun(g: Qcow2Geometry, t: Buffer, index: number, max: number): { host: number; count: number } {
  let host = 0;
  let count = 0;
  for (; count < max; count++) {
    let e;
    try {
      e = decodeL2Entry(g, t, index + count, FILE_END);
    } catch {
      break;
    }
    if (e.compressed || !e.hasHost || e.alloc !== 1 || e.zero !== 0) break;
    if (count === 0) host = e.hostOffset;
    else if (e.hostOffset !== host + count * CS) break;
  }
  return { host: count === 0 ? 0 : host, count };
}

/** Entries of all zero bits from `index` on: each must decode as unallocated, with nothing set. */
function referenceUnallocatedRun(g: Qcow2Geometry, t: Buffer, index: number, max: number): number {
  let count = 0;
  for (; count < max && t.readBigUInt64BE((index + count) * 8) === 0n; count++) {
    const e = decodeL2Entry(g, t, index + count, FILE_END);
    assert.ok(!e.compressed && !e.hasHost && e.alloc === 0 && e.zero === 0);
  }
  return count;
}

for (const version of [2, 3] as const) {
  test(`qcow2 runs (v${version}): the scanners take what the decoder takes, entry by entry`, () => {
    const g = makeGeometry(16, false, version);
    fc.assert(
      fc.property(fc.array(entryArb, { minLength: 1, maxLength: 40 }), fc.nat(), fc.integer({ min: 1, max: 50 }), (entries, at, max) => {
        const t = table(entries);
        const index = at % entries.length;
        const limit = Math.min(max, entries.length - index);
        const run = scanDataRun(g, t, index, limit, FILE_END);
        const want = referenceDataRun(g, t, index, limit);
        assert.equal(run.count, want.count);
        if (want.count > 0) assert.equal(run.host, want.host);
        assert.equal(scanUnallocatedRun(t, index, limit), referenceUnallocatedRun(g, t, index, limit));
      }),
      { numRuns: 2000 },
    );
  });
}
