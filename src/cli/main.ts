#!/usr/bin/env node
// Entry point. libuv's thread pool is sized before anything touches it: uncached file I/O
// runs there. Cached reads bypass it (sys/nowait.ts), and on small machines more threads than
// cores only contend with the event loop, so two per core, at least libuv's default of 4.
import { availableParallelism } from 'node:os';

process.env.UV_THREADPOOL_SIZE ??= String(Math.max(4, 2 * availableParallelism()));

const { runCli } = await import('./program.js');
await runCli(process.argv.slice(2));
