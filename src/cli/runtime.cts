// Process settings made before any other imgbd module runs.
import { availableParallelism } from 'node:os';

/**
 * Copies between images are bound by memory and I/O and make a few calls per MiB: baseline
 * code runs them as fast, while optimising compilation would take cores from the copy itself
 * (on 2 cores, a 1 GiB convert: 0.35 s -> 0.30 s without it, and no slower at 4 GiB).
 * bin/imgbd passes --no-opt to node for these; set here only when node was started otherwise,
 * since node:v8 loads the stream modules with it (~2 ms a command).
 */
const COPY_COMMANDS: ReadonlySet<string> = new Set(['convert', 'copy', 'compare', 'commit', 'rebase']);

export function prepareRuntime(command: string | undefined): void {
  // Uncached file I/O runs on libuv's thread pool, sized before anything touches it. Cached
  // reads bypass it (sys/nowait.ts), and on small machines more threads than cores only
  // contend with the event loop, so two per core, at least libuv's default of 4.
  process.env.UV_THREADPOOL_SIZE ??= String(Math.max(4, 2 * availableParallelism()));
  if (COPY_COMMANDS.has(command ?? '') && !process.execArgv.includes('--no-opt')) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded only when needed
    (require('node:v8') as typeof import('node:v8')).setFlagsFromString('--no-opt');
  }
}
