// ReadCoverage: bounds, overlap and completeness of structured read replies; and the PSK
// key file format shared with nbdkit and qemu.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { ReadCoverage } from '../../src/client/read-coverage.js';
import { NbdTlsError } from '../../src/client/errors.js';
import { parsePskFile } from '../../src/client/tls.js';
import { ProtocolError } from '../../src/errors.js';

describe('ReadCoverage', () => {
  it('any permutation of a partition covers exactly; any extra piece overlaps', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 2 ** 40 }),
        fc.array(fc.integer({ min: 1, max: 1000 }), { minLength: 1, maxLength: 30 }),
        fc.infiniteStream(fc.nat()),
        fc.nat(),
        (base, lengths, rand, pick) => {
          const pieces: [number, number][] = [];
          let off = base;
          for (const l of lengths) {
            pieces.push([off, l]);
            off += l;
          }
          const total = off - base;
          const shuffled = [...pieces];
          const it = rand[Symbol.iterator]();
          for (let i = shuffled.length - 1; i > 0; i--) {
            const j = it.next().value! % (i + 1);
            [shuffled[i], shuffled[j]] = [shuffled[j]!, shuffled[i]!];
          }
          const cov = new ReadCoverage(base, total);
          shuffled.forEach(([o, l], i) => {
            assert.equal(cov.complete, false);
            cov.add(o, l, `piece ${i}`);
          });
          assert.equal(cov.complete, true);
          assert.equal(cov.covered, total);
          // One more byte anywhere inside overlaps; anything outside is out of bounds.
          const at = base + (pick % total);
          assert.throws(() => cov.add(at, 1, 'extra'), (e: unknown) => e instanceof ProtocolError && /overlaps/.test(e.message));
          assert.throws(() => cov.add(base + total, 1, 'past'), (e: unknown) => e instanceof ProtocolError && /outside/.test(e.message));
        },
      ),
    );
  });

  it('refuses a piece straddling the start or the end, and empty pieces', () => {
    const cov = new ReadCoverage(100, 50);
    assert.throws(() => cov.add(99, 2, 'x'), /outside/);
    assert.throws(() => cov.add(149, 2, 'x'), /outside/);
    assert.throws(() => cov.add(120, 0, 'x'), /outside/);
    cov.add(110, 10, 'a');
    assert.throws(() => cov.add(105, 6, 'b'), /overlaps/);
    assert.throws(() => cov.add(119, 5, 'b'), /overlaps/);
    cov.add(105, 5, 'c');
    cov.add(120, 30, 'd');
    assert.equal(cov.covered, 45);
    assert.equal(cov.complete, false);
    cov.add(100, 5, 'e');
    assert.equal(cov.complete, true);
  });
});

describe('parsePskFile', () => {
  it('reads username:hexkey lines', () => {
    const entries = parsePskFile('alice:0a0B\n\nbob:ffee00\r\n');
    assert.deepEqual(entries, [
      { identity: 'alice', key: Buffer.from([0x0a, 0x0b]) },
      { identity: 'bob', key: Buffer.from([0xff, 0xee, 0x00]) },
    ]);
  });
  for (const bad of ['alice', ':00', 'alice:0', 'alice:zz', 'alice:']) {
    it(`refuses ${JSON.stringify(bad)}`, () => assert.throws(() => parsePskFile(bad), NbdTlsError));
  }
});
