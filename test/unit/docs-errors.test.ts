// Every error code the code base can throw is documented in docs/errors.md, so users and
// scripts can rely on the list.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from '../helpers/peers.js';

function sources(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...sources(p));
    else if (name.endsWith('.ts')) out.push(p);
  }
  return out;
}

test('docs/errors.md lists every ERR_ code used in src/', () => {
  const root = repoRoot();
  const docs = readFileSync(join(root, 'docs/errors.md'), 'utf8');
  const used = new Set<string>();
  for (const file of sources(join(root, 'src'))) {
    for (const m of readFileSync(file, 'utf8').matchAll(/['`](ERR_[A-Z0-9_]+)/g)) used.add(m[1]!);
  }
  assert.ok(used.size > 20, `found only ${used.size} codes: is the scan broken?`);
  const missing = [...used].filter((code) => !docs.includes(`\`${code}`)).sort();
  assert.deepEqual(missing, [], `undocumented error codes: ${missing.join(', ')}`);
});
