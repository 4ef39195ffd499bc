// Bundles the compiled CLI (dist/src/cli/program.js and everything it imports) into one
// CommonJS script, dist/imgbd.cjs, which src/cli/bundle.ts runs with V8's code cache.
// Native and WebAssembly packages stay outside, loaded from node_modules as before.
// Each module keeps its own import.meta.url (the file it was bundled from), so paths built
// from it (worker and supervisor scripts) still point into dist/src.

import { build } from 'esbuild';
import { dirname, join, relative } from 'node:path';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const dist = join(root, 'dist');

const ownUrls = {
  name: 'own-import-meta',
  setup(b) {
    b.onLoad({ filter: /[\\/]dist[\\/]src[\\/].*\.js$/ }, async (args) => {
      const text = await readFile(args.path, 'utf8');
      const here = JSON.stringify(relative(dist, args.path));
      const url = `require('node:url').pathToFileURL(require('node:path').join(__dirname, ${here})).href`;
      return {
        contents: text
          .replaceAll('import.meta.url', `(${url})`)
          .replaceAll('import.meta.resolve(', `((s) => require('node:url').pathToFileURL(require.resolve(s)).href)(`),
        loader: 'js',
      };
    });
  },
};

// commander loads node:child_process when it is loaded, for subcommands that are separate
// executables (imgbd has none); node compiles that module and the dozen it needs on every start
// (~6 ms on 2 cores). It is loaded when first used instead.
const lazyChildProcess = {
  name: 'lazy-child-process',
  setup(b) {
    b.onLoad({ filter: /[\\/]commander[\\/]lib[\\/]command\.js$/ }, async (args) => {
      const text = await readFile(args.path, 'utf8');
      const eager = "const childProcess = require('node:child_process');";
      if (!text.includes(eager)) throw new Error(`${args.path}: no longer loads node:child_process as expected; update scripts/bundle.mjs`);
      const lazy = "const childProcess = { spawn: (...a) => require('node:child_process').spawn(...a) };";
      return { contents: text.replace(eager, lazy), loader: 'js' };
    });
  },
};

// koffi's own loader finds its native module by resolving two packages and reading node's ELF
// header (~6 ms of every command, against ~0.5 ms for the dlopen itself). The bundle loads the
// module this install has for its platform directly, checked against koffi's version, and falls
// back to koffi's loader (another libc, a moved install, anything unexpected).
const koffiVersion = JSON.parse(await readFile(join(root, 'node_modules/koffi/package.json'), 'utf8')).version;
const koffiNative = join(root, `node_modules/@koromix/koffi-${process.platform}-${process.arch}/${process.platform}_${process.arch}/koffi.node`);
const directKoffi = {
  name: 'direct-koffi',
  setup(b) {
    b.onResolve({ filter: /^koffi$/ }, (args) => (args.namespace === 'direct-koffi' ? { path: 'koffi', external: true } : { path: 'koffi', namespace: 'direct-koffi' }));
    b.onLoad({ filter: /.*/, namespace: 'direct-koffi' }, () => ({
      contents: `
        let native = null;
        try {
          if (process.platform === ${JSON.stringify(process.platform)} && process.arch === ${JSON.stringify(process.arch)}) {
            const m = { exports: {} };
            process.dlopen(m, require('node:path').join(__dirname, ${JSON.stringify(relative(dist, koffiNative))}));
            if (m.exports.version === ${JSON.stringify(koffiVersion)}) native = m.exports;
          }
        } catch {
          native = null;
        }
        module.exports = native ?? require('koffi');
      `,
      loader: 'js',
      resolveDir: dist,
    }));
  },
};

await build({
  entryPoints: [join(dist, 'src/cli/program.js')],
  outfile: join(dist, 'imgbd.cjs'),
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  external: ['koffi', '@bokuweb/zstd-wasm'],
  plugins: [ownUrls, lazyChildProcess, directKoffi],
  // bundle.cts reads the bundle as latin1, which only ASCII survives unchanged.
  charset: 'ascii',
  logLevel: 'warning',
  legalComments: 'none',
});
