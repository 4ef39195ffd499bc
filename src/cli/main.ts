#!/usr/bin/env node
// Entry point. Sized before anything touches libuv's thread pool: file I/O runs there, and
// the default of 4 threads caps random-read throughput far below what the disk gives.
process.env.UV_THREADPOOL_SIZE ??= '16';

const { runCli } = await import('./program.js');
await runCli(process.argv.slice(2));
