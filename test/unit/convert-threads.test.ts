// How many compression threads convert -c starts when --threads does not say.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { compressThreads } from '../../src/image/convert.js';

test('convert -c: zlib gets a thread per core, zstd one fewer but never none', () => {
  for (const [cores, zlib, zstd] of [[1, 1, 1], [2, 2, 1], [4, 4, 3], [64, 64, 63]] as const) {
    assert.equal(compressThreads(0, cores), zlib, `zlib on ${cores} cores`);
    assert.equal(compressThreads(1, cores), zstd, `zstd on ${cores} cores`);
  }
});
