// What is attached, for `list`, `detach` and `gc`: the state files joined with what the
// kernel and procfs say now (is the supervisor alive, which partitions and mounts exist).

import { readFileSync } from 'node:fs';
import { processExists } from '../sys/pidfd.js';
import { deviceConnected, deviceMounts, kernelPartitions, SYSTEM_ROOTS, type SysRoots } from './device.js';
import { listDeviceStates, type DeviceState, type StateFileError } from './state.js';

/** Marks a supervisor's command line, so that a recycled pid is not mistaken for one. */
export const SUPERVISOR_MARKER = 'supervisor-main';

export function supervisorAlive(pid: number, roots: SysRoots = SYSTEM_ROOTS): boolean {
  if (!processExists(pid)) return false;
  try {
    const cmdline = readFileSync(`${roots.proc}/${pid}/cmdline`, 'latin1');
    return cmdline.includes(SUPERVISOR_MARKER);
  } catch {
    return false;
  }
}

/**
 * The process has not finished exiting: it exists and is neither a zombie nor dead. (While a
 * process exits, its cmdline reads empty before it becomes a zombie, so supervisorAlive()
 * alone cannot tell when it is gone.)
 */
export function processRunning(pid: number, roots: SysRoots = SYSTEM_ROOTS): boolean {
  let stat: string;
  try {
    stat = readFileSync(`${roots.proc}/${pid}/stat`, 'latin1');
  } catch {
    return false;
  }
  const state = stat.charAt(stat.lastIndexOf(')') + 2);
  return state !== 'Z' && state !== 'X' && state !== 'x';
}

export interface AttachedDevice {
  readonly state: DeviceState;
  readonly supervisorAlive: boolean;
  /** The kernel still has a client on the device. */
  readonly connected: boolean;
  readonly partitions: readonly string[];
  readonly mounts: ReadonlyArray<{ readonly device: string; readonly mountPoint: string; readonly fstype: string }>;
}

export function describeAttached(state: DeviceState, roots: SysRoots = SYSTEM_ROOTS): AttachedDevice {
  const parts = kernelPartitions(state.index, roots);
  const byDevt = new Map(parts.map((p) => [p.devt, `/dev/${p.name}`]));
  return {
    state,
    supervisorAlive: supervisorAlive(state.pid, roots),
    connected: deviceConnected(state.index, roots),
    partitions: parts.map((p) => `/dev/${p.name}`),
    mounts: deviceMounts(state.index, roots).map((m) => ({ device: byDevt.get(m.devt) ?? state.device, mountPoint: m.mountPoint, fstype: m.fstype })),
  };
}

export function listAttached(dir: string, roots: SysRoots = SYSTEM_ROOTS): { devices: AttachedDevice[]; errors: StateFileError[] } {
  const { states, errors } = listDeviceStates(dir);
  return { devices: states.map((s) => describeAttached(s, roots)), errors };
}
