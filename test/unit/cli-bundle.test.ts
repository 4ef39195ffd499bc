// The imgbd command runs its bundle with V8's code cache (src/cli/bundle.ts): one private file
// per command, reused while V8 accepts it, written again when V8 refuses it, never taken from
// a directory someone else may write.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { repoRoot, run, tempDir } from '../helpers/peers.js';

const IMGBD = join(repoRoot(), 'bin/imgbd');

async function imgbd(cacheHome: string, ...args: string[]): Promise<string> {
  const env: NodeJS.ProcessEnv = { ...process.env, XDG_CACHE_HOME: cacheHome };
  delete env.IMGBD_CODE_CACHE;
  const r = await run(IMGBD, args, { env });
  assert.equal(r.code, 0, r.stderr);
  return r.stdout;
}

const cacheFiles = (dir: string): string[] => (existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.v8')) : []);

test('the bundle is built, newer than the modules, and is what bin/imgbd runs', () => {
  const bundle = join(repoRoot(), 'dist/imgbd.cjs');
  assert.ok(statSync(bundle).mtimeMs >= statSync(join(repoRoot(), 'dist/src/cli/program.js')).mtimeMs);
  assert.match(readFileSync(bundle, 'utf8'), /runCli/);
});

test("the bundle loads koffi's native module itself, not through koffi's loader", async (t) => {
  const dir = tempDir(t);
  const image = join(dir, 'disk.raw');
  writeFileSync(image, Buffer.alloc(1 << 20, 1));
  // `map` asks the file for its data and holes with lseek(SEEK_DATA), a call made through koffi.
  const r = await run(IMGBD, ['map', '--json', image], { env: { ...process.env, IMGBD_CODE_CACHE: '0', NODE_DEBUG: 'module' } });
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout).map((e: { length: number; data: boolean }) => [e.length, e.data]), [[1 << 20, true]]);
  assert.match(r.stderr, /MODULE \d+:/, 'NODE_DEBUG=module reports module loads');
  assert.doesNotMatch(r.stderr, /looking for "koffi"|koffi[\\/]index\.cjs/);
});

test('bin/imgbd finds its package through a link to itself, a linked directory and a relative path', async (t) => {
  const dir = tempDir(t);
  mkdirSync(join(dir, 'bin'));
  symlinkSync(IMGBD, join(dir, 'bin', 'imgbd'));
  symlinkSync(join(repoRoot(), 'bin'), join(dir, 'linked-bin'));
  const version = JSON.parse(readFileSync(join(repoRoot(), 'package.json'), 'utf8')).version as string;
  const env: NodeJS.ProcessEnv = { ...process.env, IMGBD_CODE_CACHE: '0' };
  for (const path of [join(dir, 'bin', 'imgbd'), join(dir, 'linked-bin', 'imgbd'), relative(process.cwd(), IMGBD)]) {
    const r = await run(path, ['--version'], { env });
    assert.equal(r.code, 0, `${path}: ${r.stderr}`);
    assert.equal(r.stdout.trim(), version, path);
  }
});

test('a command writes its code cache once, private, and reuses it', async (t) => {
  const home = tempDir(t);
  const dir = join(home, 'imgbd', 'code');
  const version = (await imgbd(home, '--version')).trim();
  assert.match(version, /^\d+\.\d+\.\d+/);
  const [file, ...more] = cacheFiles(dir);
  assert.ok(file !== undefined && more.length === 0, `one cache file, got ${cacheFiles(dir).join(', ')}`);
  assert.match(file, /^other@[0-9a-f]{8}-v\d+/);
  assert.equal(statSync(dir).mode & 0o777, 0o700);
  assert.equal(statSync(join(dir, file)).mode & 0o777, 0o600);
  const written = statSync(join(dir, file)).mtimeMs;
  assert.equal((await imgbd(home, '--version')).trim(), version);
  assert.equal(statSync(join(dir, file)).mtimeMs, written, 'an accepted cache is not written again');

  const help = await imgbd(home, 'info', '--help');
  assert.match(help, /Usage: imgbd info/);
  assert.deepEqual(cacheFiles(dir).map((f) => f.split('@')[0]).sort(), ['info', 'other']);
});

test('a cache V8 refuses is replaced, and the command still runs', async (t) => {
  const home = tempDir(t);
  const dir = join(home, 'imgbd', 'code');
  const version = await imgbd(home, '--version');
  const file = join(dir, cacheFiles(dir)[0]!);
  const junk = Buffer.alloc(statSync(file).size, 0x5a);
  writeFileSync(file, junk);
  assert.equal(await imgbd(home, '--version'), version);
  assert.notDeepEqual(readFileSync(file), junk);
  assert.deepEqual(cacheFiles(dir), [file.slice(dir.length + 1)]);
});

test('a cache directory others may write is not used', async (t) => {
  const home = tempDir(t);
  const dir = join(home, 'imgbd', 'code');
  await imgbd(home, '--version');
  const file = join(dir, cacheFiles(dir)[0]!);
  const junk = Buffer.alloc(16, 0x5a);
  writeFileSync(file, junk);
  chmodSync(dir, 0o777);
  await imgbd(home, '--version');
  assert.deepEqual(readFileSync(file), junk, 'neither read nor rewritten');
  chmodSync(dir, 0o700);
  chmodSync(file, 0o666);
  await imgbd(home, '--version');
  // Read it would not be (others could write it); a fresh one replaces it.
  assert.equal(statSync(file).mode & 0o777, 0o600);
});
