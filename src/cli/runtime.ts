// Process settings made before any other imgbd module runs.
import { availableParallelism } from 'node:os';
import { setFlagsFromString } from 'node:v8';

/**
 * Copies between images are bound by memory and I/O and make a few calls per MiB: baseline
 * code runs them as fast, while optimising compilation would take cores from the copy itself
 * (on 2 cores, a 1 GiB convert: 0.35 s -> 0.30 s without it, and no slower at 4 GiB).
 */
const COPY_COMMANDS = new Set(['convert', 'copy', 'compare', 'commit', 'rebase']);

export function prepareRuntime(command: string | undefined): void {
  // Uncached file I/O runs on libuv's thread pool, sized before anything touches it. Cached
  // reads bypass it (sys/nowait.ts), and on small machines more threads than cores only
  // contend with the event loop, so two per core, at least libuv's default of 4.
  process.env.UV_THREADPOOL_SIZE ??= String(Math.max(4, 2 * availableParallelism()));
  if (COPY_COMMANDS.has(command ?? '')) setFlagsFromString('--no-opt');
}
