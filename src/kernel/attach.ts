// `attach` from the caller's side: start a supervisor in its own session (detached, so it
// outlives the command and any terminal), wait for its one readiness line, and return what
// it attached. The supervisor owns the device from then on (supervisor.ts).

import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, realpathSync, rmSync } from 'node:fs';
import { isAbsolute, join, resolve } from 'node:path';
import type { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { CorruptImageError, ImgbdError, UnsupportedImageError, UsageError } from '../errors.js';
import type { PartitionSelector } from '../partition/table.js';
import type { InterfaceChoice } from './attach-link.js';
import { ensureRunDir, runDir as defaultRunDir } from './state.js';
import { ReadinessReader, SupervisorError, type AttachInfo, type ReadinessMessage, type SupervisorConfig } from './supervisor-protocol.js';
import { checkPollMaxUs } from '../server/idle-poller.js';

export interface AttachOptions {
  readonly image: string;
  readonly partition?: PartitionSelector;
  readonly format?: string;
  readonly readOnly?: boolean;
  /** Where backing files may live besides the image's own directory tree (--allow-backing). */
  readonly allowBacking?: readonly string[];
  readonly mount?: { readonly dir: string; readonly options?: string };
  readonly connections?: number;
  readonly timeoutSeconds?: number;
  readonly watchPid?: number;
  /**
   * The server's idle polling (NbdServerOptions.pollMaxUs). None by default: a supervisor lives
   * as long as its device, and in a guest with emulated CPUs a polling one slowed the guest's own
   * I/O more than it saved (bench:vm: rand-read 0.93x and first-pass seq-write 0.81x of qemu-nbd
   * with 50 us, against 1.05x and 1.08-1.14x without).
   */
  readonly pollMaxUs?: number;
  readonly runDir?: string;
  readonly interface?: InterfaceChoice;
  /** How long to wait for the supervisor's readiness line. */
  readonly readyTimeoutMs?: number;
}

export const DEFAULT_TIMEOUT_SECONDS = 30;
export const MAX_CONNECTIONS = 16;
const DEFAULT_READY_TIMEOUT_MS = 180_000;
/** A supervisor serves one device: a small heap keeps its memory bounded. */
const SUPERVISOR_HEAP_MB = 256;

/** The supervisor entry point next to this file, .ts under tsx and .js when compiled. */
export function supervisorEntry(): { script: string; nodeArgs: string[] } {
  const here = fileURLToPath(import.meta.url);
  const ts = here.endsWith('.ts');
  const script = join(here, '..', ts ? 'supervisor-main.ts' : 'supervisor-main.js');
  // Resolved here, so the supervisor finds tsx whatever the caller's working directory.
  return { script, nodeArgs: ts ? ['--import', import.meta.resolve('tsx')] : ['--enable-source-maps'] };
}

export function buildSupervisorConfig(opts: AttachOptions, logFile: string): SupervisorConfig {
  const connections = opts.connections ?? 1;
  if (!Number.isInteger(connections) || connections < 1 || connections > MAX_CONNECTIONS) {
    throw new UsageError(`--connections must be between 1 and ${MAX_CONNECTIONS}, not ${connections}`);
  }
  const timeoutSeconds = opts.timeoutSeconds ?? DEFAULT_TIMEOUT_SECONDS;
  if (!Number.isInteger(timeoutSeconds) || timeoutSeconds < 1 || timeoutSeconds > 3600) {
    throw new UsageError(`--timeout must be between 1 and 3600 seconds, not ${timeoutSeconds}`);
  }
  if (opts.watchPid !== undefined && (!Number.isSafeInteger(opts.watchPid) || opts.watchPid <= 0)) {
    throw new UsageError(`--watch-pid must be a process id, not ${opts.watchPid}`);
  }
  // Checked here, not only by the supervisor's server: a bad value must not spawn one.
  if (opts.pollMaxUs !== undefined) checkPollMaxUs(opts.pollMaxUs);
  if (!existsSync(opts.image)) throw new UsageError(`${opts.image}: no such file`);
  // The real path: detach and list match images by it, whatever link was used to attach.
  const image = realpathSync(resolve(opts.image));
  let mount: SupervisorConfig['mount'];
  if (opts.mount) {
    const dir = resolve(opts.mount.dir);
    if (!existsSync(dir)) throw new UsageError(`mount point ${opts.mount.dir} does not exist`);
    mount = opts.mount.options === undefined ? { dir } : { dir, options: opts.mount.options };
  }
  // Absolute: the supervisor does not share the caller's working directory.
  const allowBacking = (opts.allowBacking ?? []).map((p) => resolve(p));
  for (const p of allowBacking) if (!existsSync(p)) throw new UsageError(`--allow-backing ${p}: no such file or directory`);
  return {
    image,
    ...(opts.format !== undefined && { format: opts.format }),
    ...(allowBacking.length > 0 && { allowBacking }),
    partition: opts.partition ?? null,
    readOnly: opts.readOnly ?? false,
    ...(mount && { mount }),
    connections,
    timeoutSeconds,
    ...(opts.watchPid !== undefined && { watchPid: opts.watchPid }),
    ...(opts.pollMaxUs !== undefined && { pollMaxUs: opts.pollMaxUs }),
    runDir: opts.runDir ?? defaultRunDir(),
    logFile,
    interface: opts.interface ?? 'auto',
  };
}

function logTail(path: string): string {
  try {
    const text = readFileSync(path, 'utf8');
    return text.split('\n').slice(-12).join('\n').trim();
  } catch {
    return '';
  }
}

/** Read the one readiness line from `pipe`; null when the pipe closes first. */
export function readReadiness(pipe: Readable, timeoutMs: number): Promise<ReadinessMessage | null> {
  return new Promise((resolveMsg, reject) => {
    const reader = new ReadinessReader();
    let done = false;
    const finish = (err: unknown, msg: ReadinessMessage | null) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      pipe.removeAllListeners('data');
      pipe.destroy();
      if (err) reject(err);
      else resolveMsg(msg);
    };
    const timer = setTimeout(
      () => finish(new SupervisorError('ERR_SUPERVISOR_TIMEOUT', `the supervisor did not report within ${timeoutMs} ms`), null),
      timeoutMs,
    );
    pipe.on('data', (d: Buffer) => {
      try {
        const msg = reader.push(d);
        if (msg) finish(null, msg);
      } catch (e) {
        finish(e, null);
      }
    });
    pipe.on('error', (e) => finish(e, null));
    pipe.on('close', () => finish(null, null));
  });
}

/** Re-create the supervisor's error as the class the CLI maps to the right exit code. */
export function errorFromSupervisor(code: string, message: string): ImgbdError {
  if (code === 'ERR_USAGE' || code === 'ERR_PARTITION_NOT_FOUND') return new UsageError(message);
  if (code === 'ERR_CORRUPT_IMAGE') return new CorruptImageError(message);
  if (code === 'ERR_UNSUPPORTED_IMAGE') return new UnsupportedImageError(message);
  return new SupervisorError(code, message);
}

/**
 * Start a supervisor for `opts` and wait until the device is usable. Rejects with
 * SupervisorError (carrying the supervisor's own error code) when it could not attach; by
 * then the supervisor has undone whatever it had set up.
 */
export async function attachImage(opts: AttachOptions): Promise<AttachInfo> {
  const dir = opts.runDir ?? defaultRunDir();
  if (!isAbsolute(dir)) throw new UsageError(`run directory ${dir} is not absolute`);
  ensureRunDir(dir);
  const logFile = join(dir, `attach-${process.pid}-${Date.now()}.log`);
  const cfg = buildSupervisorConfig({ ...opts, runDir: dir }, logFile);
  const { script, nodeArgs } = supervisorEntry();
  const logFd = openSync(logFile, 'a', 0o600);
  let child;
  try {
    child = spawn(process.execPath, [...nodeArgs, `--max-old-space-size=${SUPERVISOR_HEAP_MB}`, script, JSON.stringify(cfg)], {
      detached: true,
      stdio: ['ignore', logFd, logFd, 'pipe'],
      // mount, BLKRRPART, NBD_DO_IT and file I/O all take pool threads at once.
      env: { ...process.env, UV_THREADPOOL_SIZE: '32' },
    });
  } finally {
    closeSync(logFd);
  }
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  child.once('error', () => undefined);
  const pipe = child.stdio[3] as Readable;
  let msg: ReadinessMessage | null;
  try {
    msg = await readReadiness(pipe, opts.readyTimeoutMs ?? DEFAULT_READY_TIMEOUT_MS);
  } catch (e) {
    // Let it clean up whatever it has: SIGTERM runs the same teardown as a detach.
    child.kill('SIGTERM');
    throw e;
  }
  if (msg?.type === 'ready') {
    child.unref();
    return msg.info;
  }
  await Promise.race([exited, new Promise((r) => setTimeout(r, 5_000))]);
  if (msg?.type === 'error') {
    rmSync(logFile, { force: true });
    throw errorFromSupervisor(msg.code, msg.message);
  }
  const tail = logTail(existsSync(logFile) ? logFile : join(dir, 'nbd?.log'));
  throw new SupervisorError('ERR_SUPERVISOR_DIED', `the supervisor exited without attaching${tail ? `; its log ends:\n${tail}` : ''}`);
}
