// Running the CLI from its bundle (dist/imgbd.cjs, made by scripts/bundle.mjs) with V8's code
// cache. Loading 80 ES modules one by one costs node about 40 ms per command on 2 cores,
// mostly resolving and compiling them; one script whose compiled code comes from the cache
// starts in a fraction of that (`imgbd info` of a small image: 76 ms -> 44 ms, bare node 20 ms).
//
// The cache holds V8 bytecode for the functions one command compiled, so there is one file per
// command, written when the command exits if it was missing or V8 refused it (another node,
// other flags, another bundle). It lives under $XDG_CACHE_HOME (or ~/.cache) in a directory
// only its owner may write: bytecode is code, and a file someone else could write would run
// as whoever runs imgbd next.

import { closeSync, fstatSync, mkdirSync, openSync, readFileSync, readdirSync, renameSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { Script } from 'node:vm';

export interface CliModule {
  runCli(argv: string[]): Promise<void>;
}

/** Commands name their cache file; anything else (options, typos) shares one. */
const COMMAND_NAME = /^[a-z][a-z0-9-]{0,31}$/;

/**
 * The CLI from the bundle at `path`, or null when there is none or it is older than the
 * modules it was made from (compiled again without bundling): they are loaded instead.
 */
export function loadBundledCli(path: string, command: string | undefined): CliModule | null {
  let source: string;
  let mtimeMs: number;
  let size: number;
  try {
    const st = statSync(path);
    if (st.mtimeMs < statSync(join(__dirname, 'program.js')).mtimeMs) return null;
    ({ mtimeMs, size } = st);
    // The bundle is ASCII (esbuild escapes the rest), and latin1 reads it without UTF-8 decoding.
    source = readFileSync(path, 'latin1');
  } catch {
    return null;
  }
  const name = COMMAND_NAME.test(command ?? '') ? command! : 'other';
  const cache = codeCacheFile(`${name}@${pathHash(path)}`, `${process.version}-${process.arch}-${size}-${Math.trunc(mtimeMs)}`);
  const cachedData = cache === null ? undefined : readOwnFile(cache.file);
  const script = new Script(`(function (exports, require, module, __filename, __dirname) {${source}\n})`, { filename: path, cachedData });
  if (cache !== null && (cachedData === undefined || script.cachedDataRejected === true)) {
    process.once('exit', () => writeCodeCache(script, cache.dir, cache.file, cache.prefix));
  }
  const module = { exports: {} as Partial<CliModule> };
  // This module's own require: the bundle only asks for built-in modules and packages, which
  // resolve the same from here as from the bundle's directory, and node:module's createRequire
  // would cost every command ~1.7 ms to load.
  (script.runInThisContext() as (...a: unknown[]) => void).call(module.exports, module.exports, require, module, path, dirname(path));
  if (typeof module.exports.runCli !== 'function') throw new Error(`${path} does not export runCli: rebuild with npm run build`);
  return module.exports as CliModule;
}

/** FNV-1a of the bundle's path: installs side by side keep caches of their own. */
function pathHash(path: string): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < path.length; i++) h = Math.imul(h ^ path.charCodeAt(i), 0x01000193) >>> 0;
  return h.toString(16).padStart(8, '0');
}

/**
 * Where the cache of `prefix` (command and install) lives for this `key` (node and bundle), or
 * null when there is no private place to keep it.
 */
function codeCacheFile(prefix: string, key: string): { dir: string; file: string; prefix: string } | null {
  if (process.env.IMGBD_CODE_CACHE === '0') return null;
  try {
    const base = process.env.XDG_CACHE_HOME || join(homedir(), '.cache');
    const dir = join(base, 'imgbd', 'code');
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const st = statSync(dir);
    if (st.uid !== process.getuid?.() || (st.mode & 0o022) !== 0) return null;
    return { dir, file: join(dir, `${prefix}-${key}.v8`), prefix: `${prefix}-` };
  } catch {
    return null;
  }
}

/** The file's bytes if it belongs to us and only we can write it. */
function readOwnFile(file: string): Buffer | undefined {
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch {
    return undefined;
  }
  try {
    const st = fstatSync(fd);
    if (st.uid !== process.getuid?.() || (st.mode & 0o022) !== 0 || !st.isFile()) return undefined;
    return readFileSync(fd);
  } catch {
    return undefined;
  } finally {
    closeSync(fd);
  }
}

/** Replace the command's cache file (atomically: commands run side by side) and drop older ones. */
function writeCodeCache(script: Script, dir: string, file: string, prefix: string): void {
  try {
    const tmp = `${file}.${process.pid}.tmp`;
    writeFileSync(tmp, script.createCachedData(), { mode: 0o600 });
    renameSync(tmp, file);
    for (const entry of readdirSync(dir)) {
      const other = join(dir, entry);
      if (entry.startsWith(prefix) && other !== file && !entry.endsWith('.tmp')) unlinkSync(other);
    }
  } catch {
    // Only a cache: the next command compiles again.
  }
}
