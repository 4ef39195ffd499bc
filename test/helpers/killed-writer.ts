// Crash tests: run a module (given as source) that writes through a driver and prints the
// number of each slot it has flushed, kill it with SIGKILL once it is under way, and return
// the last slot it reported flushed (-1 for none).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { repoRoot } from './peers.js';

/** A JSON-quoted file URL of a repository file, for `import` statements in writer source. */
export function repoModule(path: string): string {
  return JSON.stringify(pathToFileURL(join(repoRoot(), path)).href);
}

export async function runWriterAndKill(source: string, killAfterMs: number): Promise<number> {
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', source], { cwd: repoRoot(), stdio: ['ignore', 'pipe', 'pipe'] });
  const closed = new Promise((resolve) => child.once('close', resolve));
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  await new Promise<void>((resolve) => {
    const check = (): void => (out.includes('\n') || child.exitCode !== null ? resolve() : void setTimeout(check, 5));
    check();
  });
  await new Promise((r) => setTimeout(r, killAfterMs));
  child.kill('SIGKILL');
  await closed;
  assert.equal(child.signalCode, 'SIGKILL', `writer ended on its own: ${err}`);
  const flushed = out.split('\n').filter((l) => l !== '').map(Number);
  return flushed.length === 0 ? -1 : Math.max(...flushed);
}
