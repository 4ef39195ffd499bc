// What `imgbd attach` and its supervisor say to each other. The attach command spawns the
// supervisor detached (its own session) with the configuration as one JSON argument; the
// supervisor answers with exactly one JSON line on fd 3, a pipe, then closes it:
//
//   {"type":"ready","info":{...AttachInfo}}          the device is usable (and mounted, if asked)
//   {"type":"error","code":"ERR_...","message":"..."} nothing is left attached
//
// EOF without a line means the supervisor died; its log says why. Pure: no I/O here.

import { ImgbdError } from '../errors.js';
import type { PartitionSelector } from '../partition/table.js';
import type { InterfaceChoice } from './attach-link.js';
import type { KernelInterface } from './state.js';

export interface SupervisorConfig {
  /** Absolute path. */
  readonly image: string;
  readonly format?: string;
  /** Absolute roots where backing files may live besides the image's own directory tree. */
  readonly allowBacking?: readonly string[];
  readonly partition: PartitionSelector | null;
  readonly readOnly: boolean;
  /** Mount the device here (detecting the filesystem type), with mount(8)-style options. */
  readonly mount?: { readonly dir: string; readonly options?: string };
  readonly connections: number;
  readonly timeoutSeconds: number;
  /** Tear down when this process exits. */
  readonly watchPid?: number;
  /** NbdServerOptions.pollMaxUs. */
  readonly pollMaxUs?: number;
  readonly runDir: string;
  /** Where the supervisor's stderr goes until it knows its device (then renamed nbdN.log). */
  readonly logFile: string;
  readonly interface: InterfaceChoice;
}

export interface AttachedPartition {
  readonly number: number;
  readonly device: string;
  readonly sizeBytes: number;
}

export interface AttachInfo {
  readonly device: string;
  readonly index: number;
  readonly image: string;
  readonly format: string;
  readonly partition: PartitionSelector | null;
  readonly supervisorPid: number;
  readonly mountpoint: string | null;
  readonly fstype: string | null;
  readonly partitions: readonly AttachedPartition[];
  readonly sizeBytes: number;
  readonly connections: number;
  readonly interface: KernelInterface;
  readonly log: string;
}

export type ReadinessMessage =
  | { readonly type: 'ready'; readonly info: AttachInfo }
  | { readonly type: 'error'; readonly code: string; readonly message: string };

/** The supervisor failed to attach; `code` is the supervisor's error code. */
export class SupervisorError extends ImgbdError {}

/** Longest readiness line accepted: a reply is a few hundred bytes plus partitions. */
export const MAX_READINESS_BYTES = 64 * 1024;

export function encodeReadiness(msg: ReadinessMessage): string {
  return `${JSON.stringify(msg)}\n`;
}

function fail(why: string): never {
  throw new ImgbdError('ERR_SUPERVISOR_PROTOCOL', `bad readiness message from the supervisor: ${why}`);
}

function checkInfo(v: unknown): AttachInfo {
  if (typeof v !== 'object' || v === null) fail('info is not an object');
  const o = v as Record<string, unknown>;
  if (typeof o.index !== 'number' || !Number.isSafeInteger(o.index) || o.index < 0) fail('index');
  if (o.device !== `/dev/nbd${o.index}`) fail('device');
  if (typeof o.image !== 'string' || typeof o.format !== 'string') fail('image/format');
  if (typeof o.supervisorPid !== 'number' || !Number.isSafeInteger(o.supervisorPid) || o.supervisorPid <= 0) fail('supervisorPid');
  if (o.mountpoint !== null && typeof o.mountpoint !== 'string') fail('mountpoint');
  if (!Array.isArray(o.partitions)) fail('partitions');
  for (const p of o.partitions as unknown[]) {
    const q = p as Record<string, unknown>;
    if (typeof q?.number !== 'number' || typeof q.device !== 'string' || typeof q.sizeBytes !== 'number') fail('partition entry');
  }
  if (o.interface !== 'netlink' && o.interface !== 'ioctl') fail('interface');
  return o as unknown as AttachInfo;
}

/** Decode the one line the supervisor sent (without the newline). */
export function decodeReadiness(line: string): ReadinessMessage {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    fail('not JSON');
  }
  const o = v as Record<string, unknown>;
  if (o?.type === 'ready') return { type: 'ready', info: checkInfo(o.info) };
  if (o?.type === 'error') {
    if (typeof o.code !== 'string' || typeof o.message !== 'string') fail('error without code and message');
    return { type: 'error', code: o.code, message: o.message };
  }
  return fail('unknown type');
}

/**
 * Accumulates bytes from the readiness pipe: returns the message once a full line is in,
 * null until then; refuses an over-long line before buffering more.
 */
export class ReadinessReader {
  private chunks: Buffer[] = [];
  private bytes = 0;

  push(data: Buffer): ReadinessMessage | null {
    const nl = data.indexOf(0x0a);
    const take = nl < 0 ? data : data.subarray(0, nl);
    if (this.bytes + take.length > MAX_READINESS_BYTES) fail(`longer than ${MAX_READINESS_BYTES} bytes`);
    this.chunks.push(take);
    this.bytes += take.length;
    if (nl < 0) return null;
    return decodeReadiness(Buffer.concat(this.chunks).toString('utf8'));
  }
}
