// The container init of `imgbd run`: PID 1 of the new pid namespace until it execs CMD, which
// then is PID 1 itself (same process). Runs on the main thread only; see run.ts for the
// process design and src/sys/namespace.ts for why nothing here may be asynchronous.

import { accessSync, constants as fsc, readSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ImgbdError } from '../errors.js';
import {
  clearNonBlocking,
  CLONE,
  execve,
  loadNamespaceBindings,
  resetSignalsForExec,
  setCloseOnExec,
  setHostname,
  setParentDeathSignal,
  unshare,
} from '../sys/namespace.js';
import { enterRoot, populateRoot, stageRoot } from './rootfs.js';
import { decodePlan, LineReader, type RunPlan } from './run-protocol.js';

const SIGKILL = 9;

/** CMD could not be started; `exitStatus` is what a shell would report (127, 126). */
export class CommandStartError extends ImgbdError {
  readonly exitStatus: number;

  constructor(code: string, message: string, exitStatus: number) {
    super(code, message);
    this.exitStatus = exitStatus;
  }
}

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/** Block until the plan line arrives; null when the run command closed the channel (it died). */
export function readPlanSync(fd: number): RunPlan | null {
  const reader = new LineReader();
  const buf = Buffer.alloc(64 * 1024);
  for (;;) {
    let n: number;
    try {
      n = readSync(fd, buf, 0, buf.length, null);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EAGAIN' || code === 'EINTR') {
        sleepSync(5);
        continue;
      }
      throw e;
    }
    if (n === 0) return null;
    const line = reader.push(buf.subarray(0, n));
    if (line !== null) return decodePlan(line);
  }
}

function executable(path: string): boolean {
  try {
    accessSync(path, fsc.X_OK);
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

/** execvp's lookup, done inside the new root: a name with '/' is taken as is. */
export function resolveCommand(name: string, env: readonly string[]): string {
  if (name.includes('/')) {
    try {
      statSync(name);
    } catch {
      throw new CommandStartError('ENOENT', `${name}: no such file in the image`, 127);
    }
    if (!executable(name)) throw new CommandStartError('EACCES', `${name}: not an executable file`, 126);
    return name;
  }
  const pathVar = env.find((e) => e.startsWith('PATH='))?.slice(5) ?? '/usr/sbin:/usr/bin:/sbin:/bin';
  for (const dir of pathVar.split(':')) {
    const candidate = join(dir === '' ? '.' : dir, name);
    if (executable(candidate)) return candidate;
  }
  throw new CommandStartError('ENOENT', `${name}: command not found in the image (PATH=${pathVar})`, 127);
}

/**
 * Everything from the first instruction to execve. Returns only by throwing; `channelFd` is
 * the socket to the run command.
 */
export function runInit(channelFd: number): void {
  loadNamespaceBindings();
  // Dies with the run command, also when it is killed: our exit then tears the namespaces down.
  setParentDeathSignal(SIGKILL);
  // Done before the plan arrives so that it overlaps the attach.
  unshare(CLONE.NEWNS | CLONE.NEWUTS | CLONE.NEWIPC);
  const plan = readPlanSync(channelFd);
  if (plan === null) throw new ImgbdError('ERR_RUN_ABORTED', 'the run command went away before the container started');
  const root = stageRoot(plan);
  if (plan.hostname !== '') setHostname(plan.hostname);
  populateRoot(root, plan.readOnly);
  enterRoot(root);
  try {
    process.chdir(plan.cwd);
  } catch {
    throw new CommandStartError('ENOENT', `working directory ${plan.cwd} does not exist in the image`, 127);
  }
  const path = resolveCommand(plan.argv[0]!, plan.env);
  for (const fd of [0, 1, 2]) {
    try {
      setCloseOnExec(fd, false);
      clearNonBlocking(fd);
    } catch {
      // A closed stdio fd stays closed for CMD too.
    }
  }
  setCloseOnExec(channelFd, true);
  resetSignalsForExec();
  try {
    execve(path, plan.argv, plan.env);
  } catch (e) {
    const code = (e as { code?: string }).code ?? 'EIO';
    throw new CommandStartError(code, `${plan.argv[0]}: ${(e as Error).message}`, code === 'ENOENT' ? 127 : 126);
  }
}
