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

await build({
  entryPoints: [join(dist, 'src/cli/program.js')],
  outfile: join(dist, 'imgbd.cjs'),
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  external: ['koffi', '@bokuweb/zstd-wasm'],
  plugins: [ownUrls],
  logLevel: 'warning',
  legalComments: 'none',
});
