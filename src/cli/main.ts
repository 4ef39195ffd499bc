#!/usr/bin/env node
// Entry point. The build also bundles the CLI into one script (dist/imgbd.cjs) that starts in
// half the time (bundle.ts); without it (running from source) the modules load one by one.
import { loadBundledCli } from './bundle.js';
import { prepareRuntime } from './runtime.js';

prepareRuntime(process.argv[2]);

const cli = import.meta.url.endsWith('.ts') ? null : loadBundledCli(new URL('../../imgbd.cjs', import.meta.url), process.argv[2]);
const { runCli } = cli ?? (await import('./program.js'));
await runCli(process.argv.slice(2));
