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

await build({
  entryPoints: [join(dist, 'src/cli/program.js')],
  outfile: join(dist, 'imgbd.cjs'),
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  external: ['koffi', '@bokuweb/zstd-wasm'],
  plugins: [ownUrls, lazyChildProcess],
  // bundle.cts reads the bundle as latin1, which only ASCII survives unchanged.
  charset: 'ascii',
  logLevel: 'warning',
  legalComments: 'none',
});
