#!/usr/bin/env node
// The imgbd command (bin/imgbd runs this). A CommonJS script: node starts one about 10 ms
// sooner than an ES module, for which it first sets up its ES module loader and a module facade
// over every built-in module imported. From here the CLI comes from its bundle (bundle.cts) or,
// when there is none, from its modules.
import { join } from 'node:path';
import { loadBundledCli, type CliModule } from './bundle.cjs';
import { prepareRuntime } from './runtime.cjs';

prepareRuntime(process.argv[2]);

const cli: CliModule | Promise<CliModule> = loadBundledCli(join(__dirname, '..', '..', 'imgbd.cjs'), process.argv[2]) ?? import('./program.js');
void Promise.resolve(cli).then((m) => m.runCli(process.argv.slice(2)));
