// Helpers shared by the attach guest scripts: shell commands, the imgbd CLI, polling, and
// the checks on /dev/nbdN that several scenarios repeat.

import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { splitDevT } from '../../../src/sys/rotational.js';

export const scratch = process.env.IMGBD_VM_SCRATCH ?? '/tmp';

export function fail(message: string): never {
  throw new Error(message);
}

/** Run a shell command; its stdout, or an error carrying stderr. */
export function sh(cmd: string, timeoutMs = 120_000): string {
  try {
    return execFileSync('sh', ['-c', cmd], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs });
  } catch (e) {
    const x = e as { status?: number; stderr?: string; stdout?: string };
    throw new Error(`${cmd} exited ${x.status}: ${x.stderr ?? ''}${x.stdout ?? ''}`);
  }
}

/** Run a shell command that must fail; its status and output. */
export function shStatus(cmd: string, timeoutMs = 120_000): { status: number | null; out: string; ms: number } {
  const t0 = Date.now();
  const r = spawnSync('sh', ['-c', cmd], { encoding: 'utf8', timeout: timeoutMs });
  return { status: r.status, out: `${r.stdout ?? ''}${r.stderr ?? ''}`, ms: Date.now() - t0 };
}

/** The imgbd CLI, as the host test passes it in $IMGBD_CLI. */
export function cli(args: string): { status: number | null; stdout: string; stderr: string } {
  const base = process.env.IMGBD_CLI ?? fail('IMGBD_CLI is not set');
  const r = spawnSync('sh', ['-c', `${base} ${args}`], { encoding: 'utf8', timeout: 240_000 });
  return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function waitUntil(what: string, cond: () => boolean, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) fail(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(50);
  }
}

export function sysRead(path: string): string | null {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return null;
  }
}

/** No client, size 0: what detach promises. */
export function released(index: number): boolean {
  return !existsSync(`/sys/block/nbd${index}/pid`) && sysRead(`/sys/block/nbd${index}/size`) === '0';
}

/** Running (a zombie awaiting its parent's wait() has exited and counts as gone). */
export function processAlive(pid: number): boolean {
  const stat = sysRead(`/proc/${pid}/stat`);
  if (stat === null) return false;
  const state = stat.charAt(stat.lastIndexOf(')') + 2);
  return state !== 'Z' && state !== 'X' && state !== 'x';
}

export function mountedAt(dir: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === dir);
}

/** /dev/<name> is a block node with the device number sysfs gives for it. */
export function nodeMatchesSysfs(name: string, sysDir: string): boolean {
  const devt = sysRead(`${sysDir}/dev`);
  try {
    const st = statSync(`/dev/${name}`);
    const { major, minor } = splitDevT(st.rdev);
    return st.isBlockDevice() && `${major}:${minor}` === devt;
  } catch {
    return false;
  }
}

export function sha256(path: string): string {
  return sh(`sha256sum ${path}`).split(' ')[0]!;
}

/** Write `text` at byte 0 of a device with O_DIRECT and read it back the same way. */
export function writeReadMarker(device: string, text: string): string {
  sh(`printf '%s' '${text}' > /tmp/marker && dd if=/tmp/marker of=/tmp/marker.blk bs=4096 conv=sync status=none`);
  sh(`dd if=/tmp/marker.blk of=${device} bs=4096 count=1 oflag=direct conv=fsync status=none`);
  return sh(`dd if=${device} bs=4096 count=1 iflag=direct status=none | head -c ${text.length}`);
}
