#!/usr/bin/env node
// The CLI as an ES module, for running it from the TypeScript sources (under tsx) and for
// scripts that name this file; bin/imgbd runs start.cjs, which starts sooner.
import { fileURLToPath } from 'node:url';
import { loadBundledCli } from './bundle.cjs';
import { prepareRuntime } from './runtime.cjs';

prepareRuntime(process.argv[2]);

const cli = import.meta.url.endsWith('.ts') ? null : loadBundledCli(fileURLToPath(new URL('../../imgbd.cjs', import.meta.url)), process.argv[2]);
const { runCli } = cli ?? (await import('./program.js'));
await runCli(process.argv.slice(2));
