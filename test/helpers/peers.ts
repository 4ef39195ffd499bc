// Finding the real peers (qemu-img, nbdinfo, …) and running them. A missing peer fails the
// suite under CI=true and skips with the reason printed elsewhere.

import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestContext } from 'node:test';

const found = new Map<string, boolean>();

export function hasPeer(command: string): boolean {
  let ok = found.get(command);
  if (ok === undefined) {
    try {
      execFileSync('sh', ['-c', `command -v ${command}`], { stdio: 'ignore' });
      ok = true;
    } catch {
      ok = false;
    }
    found.set(command, ok);
  }
  return ok;
}

/**
 * Returns true when every peer is present. Otherwise: under CI=true throws (the suite must
 * fail, not skip); locally marks the test skipped with the reason and returns false.
 */
export function requirePeers(t: TestContext, ...commands: string[]): boolean {
  const missing = commands.filter((c) => !hasPeer(c));
  if (missing.length === 0) return true;
  const why = `missing test peer(s): ${missing.join(', ')} (bash scripts/ci.sh installs them)`;
  if (process.env.CI === 'true') throw new Error(why);
  t.skip(why);
  return false;
}

/** A temporary directory removed when the test ends (cleanup registered first). */
export function tempDir(t: TestContext, prefix = 'imgbd-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export interface RunResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Run a command to completion, capturing output; never throws on a non-zero exit. */
export function run(command: string, args: readonly string[], opts: { input?: string | Buffer; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 120_000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
    });
    // A command that exits without reading its input (blkid, partx) closes the pipe: EPIPE on
    // stdin is not a failure, the exit code says whether it worked.
    child.stdin.on('error', () => {});
    child.stdin.end(opts.input ?? '');
  });
}

/** Run a command and throw with its stderr when it exits non-zero. */
export async function runOk(command: string, args: readonly string[], opts: { input?: string | Buffer; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<string> {
  const r = await run(command, args, opts);
  if (r.code !== 0) {
    throw new Error(`${command} ${args.join(' ')} exited ${r.code}\n${r.stderr}${r.stdout}`);
  }
  return r.stdout;
}

/** Spawn a long-running peer (qemu-nbd, nbdkit) that is killed when the test ends. */
export function spawnPeer(t: TestContext, command: string, args: readonly string[]): ChildProcess {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return child;
}

/** Wait until `check` returns true, polling; throws after `timeoutMs`. */
export async function waitFor(check: () => boolean | Promise<boolean>, timeoutMs = 10_000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The repository root (the folder with package.json), from source or compiled tests alike. */
export function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const up = dirname(dir);
    if (up === dir) throw new Error('package.json not found above the tests');
    dir = up;
  }
  return dir;
}
