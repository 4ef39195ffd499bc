// The record of every attached device: one JSON file per device in the run directory
// (/run/imgbd, or $IMGBD_RUN_DIR), written by its supervisor once the device is usable and
// removed by it on a clean exit. `detach`, `gc` and `list` read them; a file whose supervisor
// is gone is what `gc` reclaims. Files are written atomically (temporary file + rename) and
// validated field by field when read: a truncated or hand-edited file is reported, not trusted.
//
//   /run/imgbd/nbd<N>.json   DeviceState
//   /run/imgbd/nbd<N>.log    the supervisor's log

import { mkdirSync, readdirSync, readFileSync, renameSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ImgbdError } from '../errors.js';
import type { PartitionSelector } from '../partition/table.js';

export const DEFAULT_RUN_DIR = '/run/imgbd';
export const STATE_VERSION = 1;

export type KernelInterface = 'netlink' | 'ioctl';

export interface DeviceState {
  readonly version: typeof STATE_VERSION;
  readonly index: number;
  /** /dev/nbd<index> */
  readonly device: string;
  /** Absolute path of the image. */
  readonly image: string;
  readonly format: string;
  /** The partition exported alone (IMAGE:N / IMAGE:name=X); null for the whole image. */
  readonly partition: PartitionSelector | null;
  readonly readOnly: boolean;
  /** The supervisor serving the device. */
  readonly pid: number;
  /** Where the supervisor mounted the device; null when it did not mount it. */
  readonly mountpoint: string | null;
  readonly connections: number;
  /** ISO 8601. */
  readonly created: string;
  readonly interface: KernelInterface;
  /** NBD_ATTR_BACKEND_IDENTIFIER given to the kernel ("imgbd:<image>"). */
  readonly backend: string;
  readonly log: string;
}

/** A state file that cannot be parsed or fails validation. */
export class StateFileError extends ImgbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_STATE_FILE', message, options);
  }
}

export function runDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.IMGBD_RUN_DIR || DEFAULT_RUN_DIR;
}

export function statePath(dir: string, index: number): string {
  return join(dir, `nbd${index}.json`);
}

export function logPath(dir: string, index: number): string {
  return join(dir, `nbd${index}.log`);
}

export function ensureRunDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
}

function isIndex(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 && v < 1 << 20;
}

function isPid(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v > 0 && v < 1 << 22;
}

function isPartition(v: unknown): v is PartitionSelector | null {
  if (v === null) return true;
  if (typeof v === 'number') return Number.isSafeInteger(v) && v >= 1 && v <= 256;
  return typeof v === 'object' && v !== null && typeof (v as { name?: unknown }).name === 'string' && Object.keys(v).length === 1;
}

/** Validate a parsed state file; throws StateFileError naming the first bad field. */
export function parseDeviceState(text: string, where: string): DeviceState {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (cause) {
    throw new StateFileError(`${where}: not JSON`, { cause });
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new StateFileError(`${where}: not a JSON object`);
  const o = v as Record<string, unknown>;
  const bad = (field: string): never => {
    throw new StateFileError(`${where}: field ${field} is missing or invalid (${JSON.stringify(o[field])})`);
  };
  if (o.version !== STATE_VERSION) bad('version');
  if (!isIndex(o.index)) bad('index');
  if (o.device !== `/dev/nbd${o.index as number}`) bad('device');
  if (typeof o.image !== 'string' || !o.image.startsWith('/')) bad('image');
  if (typeof o.format !== 'string' || !/^[a-z0-9]+$/.test(o.format)) bad('format');
  if (!isPartition(o.partition)) bad('partition');
  if (typeof o.readOnly !== 'boolean') bad('readOnly');
  if (!isPid(o.pid)) bad('pid');
  if (o.mountpoint !== null && (typeof o.mountpoint !== 'string' || !o.mountpoint.startsWith('/'))) bad('mountpoint');
  if (typeof o.connections !== 'number' || !Number.isInteger(o.connections) || o.connections < 1 || o.connections > 64) bad('connections');
  if (typeof o.created !== 'string' || Number.isNaN(Date.parse(o.created))) bad('created');
  if (o.interface !== 'netlink' && o.interface !== 'ioctl') bad('interface');
  if (typeof o.backend !== 'string') bad('backend');
  if (typeof o.log !== 'string') bad('log');
  return {
    version: STATE_VERSION,
    index: o.index as number,
    device: o.device as string,
    image: o.image as string,
    format: o.format as string,
    partition: o.partition as PartitionSelector | null,
    readOnly: o.readOnly as boolean,
    pid: o.pid as number,
    mountpoint: o.mountpoint as string | null,
    connections: o.connections as number,
    created: o.created as string,
    interface: o.interface as KernelInterface,
    backend: o.backend as string,
    log: o.log as string,
  };
}

/** Write the state atomically: readers see the old file or the new one, never a torn one. */
export function writeDeviceState(dir: string, state: DeviceState): void {
  ensureRunDir(dir);
  const path = statePath(dir, state.index);
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(state, null, 2)}\n`, { mode: 0o600 });
  renameSync(tmp, path);
}

/** The state of device `index`; null when there is none. */
export function readDeviceState(dir: string, index: number): DeviceState | null {
  const path = statePath(dir, index);
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
  const s = parseDeviceState(text, path);
  if (s.index !== index) throw new StateFileError(`${path}: records device ${s.index}`);
  return s;
}

export interface StateListing {
  readonly states: DeviceState[];
  /** Files that exist but could not be used. */
  readonly errors: StateFileError[];
}

/** Every state file in `dir`, by device index. */
export function listDeviceStates(dir: string): StateListing {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { states: [], errors: [] };
    throw e;
  }
  const states: DeviceState[] = [];
  const errors: StateFileError[] = [];
  for (const name of names) {
    const m = /^nbd(\d+)\.json$/.exec(name);
    if (!m) continue;
    try {
      const s = readDeviceState(dir, Number(m[1]));
      if (s) states.push(s);
    } catch (e) {
      errors.push(e instanceof StateFileError ? e : new StateFileError(`${join(dir, name)}: ${(e as Error).message}`, { cause: e }));
    }
  }
  states.sort((a, b) => a.index - b.index);
  return { states, errors };
}

/**
 * Remove the state of device `index`, but only if it still belongs to supervisor `pid` (when
 * given): a slow exiting supervisor must not delete the record of a newer attach.
 */
export function removeDeviceState(dir: string, index: number, pid?: number): boolean {
  if (pid !== undefined) {
    let current: DeviceState | null;
    try {
      current = readDeviceState(dir, index);
    } catch {
      current = null;
    }
    if (current !== null && current.pid !== pid) return false;
  }
  try {
    unlinkSync(statePath(dir, index));
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
}
