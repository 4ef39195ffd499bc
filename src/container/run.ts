// `imgbd run nbd:IMAGE[:PART] CMD...`: CMD as PID 1 of new mount, pid, uts and ipc
// namespaces, with the image's filesystem as its root.
//
// Node cannot fork into new namespaces, so the processes are:
//
//   run (this process)       unshare(CLONE_NEWPID) affects only the children it creates next:
//     │                      it spawns the init, then setns() back to its own pid namespace so
//     │                      the supervisor it starts afterwards stays in the host's.
//     ├─ init (PID 1)        node running run-init-main.ts: PR_SET_PDEATHSIG(SIGKILL), its own
//     │                      mount/uts/ipc namespaces, waits for the plan on fd 3, mounts the
//     │                      device, builds /proc and /dev, pivot_root, then execve(CMD): CMD
//     │                      *is* PID 1 from then on, reaping and signal semantics included.
//     └─ supervisor          attachImage() with --watch-pid on the init (= CMD) process.
//
// The init starts before the attach, so node's start-up overlaps the supervisor's. The image
// is mounted only inside the container's mount namespace, never in the host's.
//
// Teardown, in order: CMD exits (or dies) → its namespaces die, and the kernel unmounts the
// filesystem (writing it back) before the exit is visible → the supervisor's pidfd on CMD
// fires → it flushes and disconnects the device → this command sees the device released and
// returns CMD's status (128+N for signal N).
//
// When this command is killed (SIGKILL included), the parent-death signal kills CMD, and the
// same chain unmounts and detaches. The supervisor watches CMD rather than this process
// because CMD's exit is what guarantees the unmount is complete: watching this process would
// let the disconnect race the namespace's final writeback.

import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { ImgbdError, UsageError } from '../errors.js';
import { attachImage } from '../kernel/attach.js';
import { deviceReleased } from '../kernel/attach-detach.js';
import type { InterfaceChoice } from '../kernel/attach-link.js';
import { processRunning } from '../kernel/attach-list.js';
import { ensureRunDir, runDir as defaultRunDir } from '../kernel/state.js';
import type { AttachInfo } from '../kernel/supervisor-protocol.js';
import { parseMountOptions } from '../sys/mount.js';
import { CLONE, setns, unshare } from '../sys/namespace.js';
import { probeRootFilesystem } from './rootfs-probe.js';
import { decodeFailure, encodePlan, LineReader, type InitFailure, type RunPlan } from './run-protocol.js';
import type { ImageSpec } from './spec.js';

export interface RunOptions {
  readonly spec: ImageSpec;
  readonly argv: readonly string[];
  /** Attach and mount read-write (default read-only). */
  readonly readWrite?: boolean;
  readonly format?: string;
  /** Where backing files may live besides the image's own directory tree (--allow-backing). */
  readonly allowBacking?: readonly string[];
  /** mount(8)-style options for the root filesystem. */
  readonly mountOptions?: string;
  readonly hostname?: string;
  /** KEY=VALUE entries added to (or replacing in) the default environment. */
  readonly env?: readonly string[];
  readonly cwd?: string;
  readonly runDir?: string;
  readonly interface?: InterfaceChoice;
  readonly timeoutSeconds?: number;
  /** How long to wait for the device to be released after CMD ends. */
  readonly releaseTimeoutMs?: number;
}

export interface RunResult {
  /** CMD's exit status, or 128+N when signal N ended it. */
  readonly status: number;
  /** Set when CMD never started (not found: 127, not executable: 126). */
  readonly startFailure?: InitFailure;
  readonly device: string;
}

export const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const DEFAULT_RELEASE_TIMEOUT_MS = 60_000;
const INIT_HEAP_MB = 64;

/** The init entry point next to this file, .ts under tsx and .js when compiled. */
function initEntry(): { script: string; nodeArgs: string[] } {
  const here = fileURLToPath(import.meta.url);
  const ts = here.endsWith('.ts');
  return {
    script: join(here, '..', ts ? 'run-init-main.ts' : 'run-init-main.js'),
    nodeArgs: ts ? ['--import', import.meta.resolve('tsx')] : [],
  };
}

/** The container's environment: a fixed base, TERM from ours, then the caller's entries. */
export function containerEnv(extra: readonly string[], term: string | undefined): string[] {
  const env = new Map<string, string>([
    ['PATH', DEFAULT_PATH],
    ['HOME', '/root'],
    ['container', 'imgbd'],
  ]);
  if (term) env.set('TERM', term);
  for (const e of extra) {
    const eq = e.indexOf('=');
    if (eq <= 0 || e.includes('\0')) throw new UsageError(`environment entry ${JSON.stringify(e)} is not KEY=VALUE`);
    env.set(e.slice(0, eq), e.slice(eq + 1));
  }
  return [...env].map(([k, v]) => `${k}=${v}`);
}

/** Spawn the init as the first process of a new pid namespace. */
function spawnInit(): ChildProcess {
  const { script, nodeArgs } = initEntry();
  const ownPidNs = openSync('/proc/self/ns/pid', 'r');
  try {
    unshare(CLONE.NEWPID);
    try {
      return spawn(process.execPath, [...nodeArgs, `--max-old-space-size=${INIT_HEAP_MB}`, script], {
        stdio: ['inherit', 'inherit', 'inherit', 'pipe'],
      });
    } finally {
      // Later children (the supervisor) belong in our own pid namespace.
      setns(ownPidNs, CLONE.NEWPID);
    }
  } finally {
    closeSync(ownPidNs);
  }
}

/** Resolves with the init's failure line, or null when the channel closed without one (CMD started). */
function readFailure(channel: Duplex): Promise<InitFailure | null> {
  return new Promise((resolve) => {
    const reader = new LineReader();
    let done = false;
    const finish = (v: InitFailure | null) => {
      if (done) return;
      done = true;
      resolve(v);
    };
    channel.on('data', (d: Buffer) => {
      try {
        const line = reader.push(d);
        if (line !== null) finish(decodeFailure(line));
      } catch (e) {
        finish({ code: (e as ImgbdError).code ?? 'ERR_RUN_PROTOCOL', message: (e as Error).message });
      }
    });
    channel.on('error', () => finish(null));
    channel.on('close', () => finish(null));
  });
}

function exitOf(child: ChildProcess): Promise<number> {
  return new Promise((resolve) => {
    const done = (code: number | null, signal: NodeJS.Signals | null) => {
      resolve(code ?? 128 + (signal ? (osConstants.signals[signal] ?? 0) : 0));
    };
    if (child.exitCode !== null || child.signalCode !== null) done(child.exitCode, child.signalCode);
    else child.once('exit', done);
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Wait until the supervisor has exited and the kernel has let the device go. */
async function waitForTeardown(info: AttachInfo, timeoutMs: number): Promise<void> {
  try {
    process.kill(info.supervisorPid, 'SIGTERM');
  } catch {
    // Already gone: it saw CMD exit first.
  }
  const deadline = Date.now() + timeoutMs;
  while (processRunning(info.supervisorPid) || !deviceReleased(info.index)) {
    if (Date.now() > deadline) {
      throw new ImgbdError('ERR_DETACH_TIMEOUT', `${info.device} was not released within ${timeoutMs} ms after the container ended; see ${info.log}`);
    }
    await sleep(50);
  }
}

/** Forward termination signals to CMD; a second one kills it. */
function forwardSignals(child: ChildProcess): () => void {
  let count = 0;
  const handler = (sig: NodeJS.Signals) => {
    count++;
    child.kill(count > 1 ? 'SIGKILL' : sig);
  };
  const sigs = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT'] as const;
  for (const s of sigs) process.on(s, handler);
  return () => {
    for (const s of sigs) process.off(s, handler);
  };
}

export async function runContainer(opts: RunOptions): Promise<RunResult> {
  if (opts.argv.length === 0 || opts.argv[0] === '') throw new UsageError('no command to run: imgbd run nbd:IMAGE[:PART] [--] CMD [ARGS...]');
  const readOnly = opts.readWrite !== true;
  const mount = parseMountOptions(opts.mountOptions, readOnly);
  const env = containerEnv(opts.env ?? [], process.env.TERM);
  const cwd = opts.cwd ?? '/';
  if (!cwd.startsWith('/')) throw new UsageError(`--workdir must be absolute, not ${cwd}`);
  const dir = opts.runDir ?? defaultRunDir();
  const probe = await probeRootFilesystem(opts.spec, opts.format, opts.allowBacking);
  ensureRunDir(dir);

  const child = spawnInit();
  const exited = exitOf(child);
  child.once('error', () => undefined);
  const channel = child.stdio[3] as Duplex;
  const failure = readFailure(channel);
  let info: AttachInfo;
  try {
    if (child.pid === undefined) throw new ImgbdError('ERR_RUN_SPAWN', `cannot start the container init (${process.execPath})`);
    info = await attachImage({
      image: opts.spec.image,
      ...(opts.spec.partition !== undefined && { partition: opts.spec.partition }),
      format: probe.format,
      ...(opts.allowBacking !== undefined && { allowBacking: opts.allowBacking }),
      readOnly,
      watchPid: child.pid,
      runDir: dir,
      ...(opts.interface !== undefined && { interface: opts.interface }),
      ...(opts.timeoutSeconds !== undefined && { timeoutSeconds: opts.timeoutSeconds }),
    });
  } catch (e) {
    child.kill('SIGKILL');
    await exited;
    throw e;
  }
  const plan: RunPlan = {
    device: info.device,
    fstype: probe.fstype,
    readOnly,
    mountFlags: mount.flags,
    mountData: mount.data,
    stageDir: dir,
    hostname: opts.hostname ?? 'imgbd',
    argv: opts.argv,
    env,
    cwd,
  };
  const unforward = forwardSignals(child);
  let status: number;
  let startFailure: InitFailure | null;
  try {
    channel.write(encodePlan(plan));
    [status, startFailure] = await Promise.all([exited, failure]);
  } finally {
    unforward();
  }
  await waitForTeardown(info, opts.releaseTimeoutMs ?? DEFAULT_RELEASE_TIMEOUT_MS);
  if (startFailure !== null) {
    if (startFailure.exitStatus === undefined) throw new ImgbdError(startFailure.code, `container setup failed: ${startFailure.message}`);
    return { status: startFailure.exitStatus, startFailure, device: info.device };
  }
  return { status, device: info.device };
}
