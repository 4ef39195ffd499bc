// Protocol-level request checks: a table of (command, flags, negotiated state) -> errno.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { validateRequest, type ValidationContext } from '../../src/server/validate.js';
import { BufferPool, REPLY_HEADROOM } from '../../src/server/buffer-pool.js';

// HAS_FLAGS|FLUSH|FUA|TRIM|WRITE_ZEROES|DF|CACHE|FAST_ZERO
const FULL: ValidationContext = { flags: 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80 | 0x400 | 0x800, maxPayloadBytes: 1 << 20, metaContexts: 1 };
// Read-only, simple replies, no contexts.
const BARE: ValidationContext = { flags: 0x1 | 0x2, maxPayloadBytes: 1 << 20, metaContexts: 0 };

const CASES: [string, number, number, number, number, ValidationContext, string | null][] = [
  ['plain read', 0, 0, 0, 4096, FULL, null],
  ['read with DF', 0, 4, 0, 4096, FULL, null],
  ['read with DF, no structured replies', 0, 4, 0, 4096, BARE, 'EINVAL'],
  ['read with FUA, FUA negotiated', 0, 1, 0, 4096, FULL, null],
  ['read with FUA, not negotiated', 0, 1, 0, 4096, BARE, 'EINVAL'],
  ['read over the maximum payload', 0, 0, 0, (1 << 20) + 1, FULL, 'EINVAL'],
  ['read with REQ_ONE', 0, 8, 0, 4096, FULL, 'EINVAL'],
  ['unknown flag bit 15', 0, 0x8000, 0, 4096, FULL, 'EINVAL'],
  ['write with NO_HOLE', 1, 2, 0, 4096, FULL, 'EINVAL'],
  ['write over the maximum payload', 1, 0, 0, (1 << 20) + 1, FULL, 'EINVAL'],
  ['flush', 3, 0, 0, 0, FULL, null],
  ['flush not advertised', 3, 0, 0, 0, BARE, 'EINVAL'],
  ['flush with a length', 3, 0, 0, 1, FULL, 'EINVAL'],
  ['trim', 4, 0, 0, 1 << 30, FULL, null],
  ['trim not advertised', 4, 0, 0, 4096, BARE, 'EINVAL'],
  ['write zeroes NO_HOLE|FAST_ZERO|FUA', 6, 0x13, 0, 1 << 30, FULL, null],
  ['write zeroes FAST_ZERO not advertised', 6, 0x10, 0, 4096, { ...FULL, flags: FULL.flags & ~0x800 }, 'EINVAL'],
  ['write zeroes not advertised', 6, 0, 0, 4096, BARE, 'EINVAL'],
  ['block status REQ_ONE', 7, 8, 0, 4096, FULL, null],
  ['block status without contexts', 7, 0, 0, 4096, BARE, 'EINVAL'],
  ['block status with DF', 7, 4, 0, 4096, FULL, 'EINVAL'],
  ['cache', 5, 0, 0, 1 << 30, FULL, null],
  ['unknown command', 42, 0, 0, 0, FULL, 'EINVAL'],
  ['resize (experimental, not offered)', 8, 0, 0, 0, FULL, 'EINVAL'],
];

for (const [name, type, flags, offset, length, ctx, want] of CASES) {
  test(`validate: ${name}`, () => {
    const got = validateRequest(type, flags, offset, length, ctx);
    assert.equal(got?.errno ?? null, want, got?.message);
  });
}

test('buffer pool reuses released buffers of a class and leaves one-offs to the GC', () => {
  const pool = new BufferPool(1 << 20);
  const a = pool.acquire(4096);
  assert.equal(a.length, REPLY_HEADROOM + 4096);
  pool.release(a);
  assert.equal(pool.acquire(3000), a, 'same class, same buffer');
  const big = pool.acquire(5 << 20);
  pool.release(big);
  assert.notEqual(pool.acquire(5 << 20), big);
  // The idle cap bounds what is kept.
  const many = Array.from({ length: 8 }, () => pool.acquire(256 << 10));
  many.forEach((b) => pool.release(b));
  const again = new Set(Array.from({ length: 8 }, () => pool.acquire(256 << 10)));
  assert.ok(many.filter((b) => again.has(b)).length < 8);
});
