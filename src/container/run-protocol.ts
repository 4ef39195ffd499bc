// What `imgbd run` and its container init say to each other over fd 3 (a socketpair). The
// run command sends one JSON line, the plan, once the image is attached; the init answers
// only when something fails before CMD starts:
//
//   run → init   {"type":"plan", ...RunPlan}
//   init → run   {"type":"error","code":"ENOENT","message":"...","exitStatus":127}
//
// The init marks fd 3 close-on-exec, so EOF without a line means execve(CMD) succeeded and
// the init's exit status from then on is CMD's. Pure: no I/O here.

import { ImgbdError } from '../errors.js';

export interface RunPlan {
  /** The block device holding the root filesystem (/dev/nbdN). */
  readonly device: string;
  readonly fstype: string;
  readonly readOnly: boolean;
  /** MS_* flags for mount(2) (MS_RDONLY included when read-only). */
  readonly mountFlags: number;
  /** Filesystem-specific mount options (mount(2) data). */
  readonly mountData: string;
  /** An existing directory the init shadows with a private tmpfs to stage the new root. */
  readonly stageDir: string;
  readonly hostname: string;
  /** CMD and its arguments; argv[0] is looked up in PATH inside the image when it has no '/'. */
  readonly argv: readonly string[];
  readonly env: readonly string[];
  /** Working directory inside the container. */
  readonly cwd: string;
}

export interface InitFailure {
  readonly code: string;
  readonly message: string;
  /** Exit status to report for CMD (127 not found, 126 not executable); absent: a setup error. */
  readonly exitStatus?: number;
}

/** Longest line either side accepts: argv and env are bounded by the kernel's ARG_MAX anyway. */
export const MAX_RUN_LINE_BYTES = 4 * 1024 * 1024;

export class RunProtocolError extends ImgbdError {
  constructor(message: string) {
    super('ERR_RUN_PROTOCOL', message);
  }
}

export function encodePlan(plan: RunPlan): string {
  return `${JSON.stringify({ type: 'plan', ...plan })}\n`;
}

export function encodeFailure(f: InitFailure): string {
  return `${JSON.stringify({ type: 'error', ...f })}\n`;
}

function isStringArray(v: unknown): v is string[] {
  return Array.isArray(v) && v.every((s) => typeof s === 'string' && !s.includes('\0'));
}

function parseLine(line: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    throw new RunProtocolError('not JSON');
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new RunProtocolError('not a JSON object');
  return v as Record<string, unknown>;
}

export function decodePlan(line: string): RunPlan {
  const o = parseLine(line);
  const bad = (field: string): never => {
    throw new RunProtocolError(`plan field ${field} is missing or invalid`);
  };
  if (o.type !== 'plan') bad('type');
  for (const k of ['device', 'fstype', 'mountData', 'stageDir', 'hostname', 'cwd'] as const) {
    if (typeof o[k] !== 'string' || (o[k] as string).includes('\0')) bad(k);
  }
  if (!(o.device as string).startsWith('/dev/')) bad('device');
  if (!(o.stageDir as string).startsWith('/')) bad('stageDir');
  if (!(o.cwd as string).startsWith('/')) bad('cwd');
  if (!/^[a-z0-9_.]+$/.test(o.fstype as string)) bad('fstype');
  if (typeof o.readOnly !== 'boolean') bad('readOnly');
  if (typeof o.mountFlags !== 'number' || !Number.isInteger(o.mountFlags) || o.mountFlags < 0 || o.mountFlags > 0xffffffff) bad('mountFlags');
  if (o.readOnly === true && ((o.mountFlags as number) & 1) === 0) bad('mountFlags');
  if (!isStringArray(o.argv) || o.argv.length === 0 || o.argv[0] === '') bad('argv');
  if (!isStringArray(o.env) || !o.env.every((e) => e.includes('='))) bad('env');
  return {
    device: o.device as string,
    fstype: o.fstype as string,
    readOnly: o.readOnly as boolean,
    mountFlags: o.mountFlags as number,
    mountData: o.mountData as string,
    stageDir: o.stageDir as string,
    hostname: o.hostname as string,
    argv: o.argv as string[],
    env: o.env as string[],
    cwd: o.cwd as string,
  };
}

export function decodeFailure(line: string): InitFailure {
  const o = parseLine(line);
  if (o.type !== 'error' || typeof o.code !== 'string' || typeof o.message !== 'string') throw new RunProtocolError('bad error line from the container init');
  if (o.exitStatus !== undefined && (typeof o.exitStatus !== 'number' || !Number.isInteger(o.exitStatus) || o.exitStatus < 0 || o.exitStatus > 255)) {
    throw new RunProtocolError('bad exitStatus from the container init');
  }
  return o.exitStatus === undefined ? { code: o.code, message: o.message } : { code: o.code, message: o.message, exitStatus: o.exitStatus };
}

/** Collects bytes into one newline-terminated line, refusing an over-long one before buffering it. */
export class LineReader {
  private chunks: Buffer[] = [];
  private bytes = 0;

  /** The line (without the newline) once complete, else null. */
  push(data: Buffer): string | null {
    const nl = data.indexOf(0x0a);
    const take = nl < 0 ? data : data.subarray(0, nl);
    if (this.bytes + take.length > MAX_RUN_LINE_BYTES) throw new RunProtocolError(`line longer than ${MAX_RUN_LINE_BYTES} bytes`);
    this.chunks.push(take);
    this.bytes += take.length;
    return nl < 0 ? null : Buffer.concat(this.chunks).toString('utf8');
  }
}
