// Running the imgbd CLI from interop tests: from the TypeScript sources under tsx, or from the
// compiled tree when the suite runs from dist. `serve` is spawned on a unix socket in the test's
// temporary directory and killed when the test ends.

import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { TestContext } from 'node:test';
import { run, type RunResult } from '../helpers/peers.js';

const fromSource = import.meta.url.endsWith('.ts');
const mainPath = fileURLToPath(new URL(`../../src/cli/main.${fromSource ? 'ts' : 'js'}`, import.meta.url));

/** argv for `node` that runs the CLI with `args`. */
export function imgbdArgv(args: readonly string[]): string[] {
  return fromSource ? ['--import', import.meta.resolve('tsx'), mainPath, ...args] : [mainPath, ...args];
}

export function runImgbd(args: readonly string[], timeoutMs = 120_000): Promise<RunResult> {
  return run(process.execPath, imgbdArgv(args), { timeoutMs });
}

export async function runImgbdOk(args: readonly string[]): Promise<string> {
  const r = await runImgbd(args);
  if (r.code !== 0) throw new Error(`imgbd ${args.join(' ')} exited ${r.code}\n${r.stderr}${r.stdout}`);
  return r.stdout;
}

export interface ServedImage {
  readonly uri: string;
  readonly child: ChildProcess;
  /** Resolves with the exit code (or the signal's name) once the server has exited. */
  readonly exited: Promise<number | string>;
}

/**
 * Start `imgbd serve ... -k SOCKET IMAGE` and resolve with the URI it prints once it listens;
 * rejects with its stderr when it exits first.
 */
export function serveImgbd(t: TestContext, socket: string, args: readonly string[]): Promise<ServedImage> {
  const child = spawn(process.execPath, imgbdArgv(['serve', '-k', socket, ...args]), { stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const exited = new Promise<number | string>((res) => child.on('exit', (code, sig) => res(code ?? sig ?? -1)));
  return new Promise((resolve, reject) => {
    let out = '';
    let err = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const nl = out.indexOf('\n');
      if (nl >= 0) resolve({ uri: out.slice(0, nl).trim(), child, exited });
    });
    child.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
    });
    child.on('exit', (code) => reject(new Error(`imgbd serve exited ${code} before listening: ${err}`)));
  });
}

/** Stop a server started by serveImgbd and wait for it to go. */
export async function stopServe(s: ServedImage, signal: NodeJS.Signals = 'SIGTERM'): Promise<number | string> {
  if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill(signal);
  return s.exited;
}
