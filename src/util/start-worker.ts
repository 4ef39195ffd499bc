// Worker threads that run a module of this tree: its .js once built; under tsx (running from
// source) the loader does not reach worker threads, so the thread registers it first.

import { createRequire } from 'node:module';
import type { Worker } from 'node:worker_threads';

/** A thread running `script`, a module URL ending in .js or (under tsx) .ts. */
export function startWorker(script: URL, workerData?: unknown): Worker {
  // node:worker_threads is loaded with the first thread: most commands never start one.
  const { Worker } = createRequire(import.meta.url)('node:worker_threads') as typeof import('node:worker_threads');
  if (!script.pathname.endsWith('.ts')) return new Worker(script, { workerData });
  const api = import.meta.resolve('tsx/esm/api');
  const body = `import(${JSON.stringify(api)}).then((m) => { m.register(); return import(${JSON.stringify(script.href)}); });`;
  return new Worker(body, { eval: true, workerData });
}

/** `name` (without extension) beside `here` (an import.meta.url), in the same flavour: .ts or .js. */
export function siblingModule(name: string, here: string): URL {
  return new URL(`./${name}${here.endsWith('.ts') ? '.ts' : '.js'}`, here);
}
