#!/usr/bin/env node
// Runs the compiled test files with Node's test runner. Arguments narrow the run to
// test folders or files (e.g. `node scripts/run-tests.mjs unit interop/server`).
import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { spawnSync } from 'node:child_process';

const root = 'dist/test';
const wanted = process.argv.slice(2);

function collect(dir) {
  const out = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...collect(path));
    else if (name.endsWith('.test.js')) out.push(path);
  }
  return out;
}

const files = collect(root).filter((f) => {
  if (wanted.length === 0) return true;
  const rel = relative(root, f);
  return wanted.some((w) => rel.startsWith(w));
});
if (files.length === 0) {
  console.error(`no test files match ${wanted.join(' ') || '(all)'}`);
  process.exit(1);
}
const concurrency = process.env.TEST_CONCURRENCY ?? '2';
const r = spawnSync(
  process.execPath,
  ['--enable-source-maps', '--test', `--test-concurrency=${concurrency}`, '--test-reporter=spec', ...files],
  { stdio: 'inherit' },
);
process.exit(r.status ?? 1);
