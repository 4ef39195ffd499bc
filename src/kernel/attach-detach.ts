// `detach` and `gc`: take an attached device away. With a live supervisor, ask it (SIGTERM:
// it unmounts what it mounted, flushes, disconnects) and wait until the kernel has let the
// device go (no /sys/block/nbdN/pid, size 0). With a dead one, do its job: disconnect first
// (so every pending request fails at once instead of waiting for the dead-connection timeout),
// then unmount what it had mounted, and remove its state file.
//
// Nothing is torn down under a user unless --force: a mount imgbd did not make, a holder
// (dm, md), another process with the device open, or an exclusive opener all refuse.

import { constants as fsc, realpathSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { ImgbdError, UsageError } from '../errors.js';
import { MNT_DETACH, unmountFilesystem } from '../sys/mount.js';
import { disconnectDevice } from './attach-link.js';
import { processRunning, supervisorAlive } from './attach-list.js';
import { deviceConnected, deviceHolders, deviceMounts, deviceOpeners, deviceSizeBytes, parseNbdName, readMounts, SYSTEM_ROOTS, type SysRoots } from './device.js';
import { listDeviceStates, readDeviceState, removeDeviceState, type DeviceState } from './state.js';

/** The device is in use by something imgbd did not set up. */
export class DeviceBusyError extends ImgbdError {
  readonly reasons: readonly string[];

  constructor(device: string, reasons: readonly string[]) {
    super('ERR_DEVICE_BUSY', `${device} is in use: ${reasons.join('; ')} (use --force to detach anyway)`);
    this.reasons = reasons;
  }
}

export class NotAttachedError extends UsageError {
  constructor(message: string) {
    super(message);
    (this as { code: string }).code = 'ERR_NOT_ATTACHED';
  }
}

function realpathOr(p: string): string {
  try {
    return realpathSync(p);
  } catch {
    return p;
  }
}

/** DEVICE (/dev/nbdN, nbdN, /dev/nbdNpM), MOUNTPOINT or IMAGE → the state of the device it names. */
export function resolveDetachTarget(target: string, dir: string, roots: SysRoots = SYSTEM_ROOTS): DeviceState {
  const name = parseNbdName(target);
  if (name !== null) {
    const s = readDeviceState(dir, name.index);
    if (!s) throw new NotAttachedError(`/dev/nbd${name.index} was not attached by imgbd (no state in ${dir})`);
    return s;
  }
  const path = realpathOr(target);
  const { states } = listDeviceStates(dir);
  const byMount = states.filter((s) => s.mountpoint !== null && realpathOr(s.mountpoint) === path);
  if (byMount.length === 1) return byMount[0]!;
  // A mount point imgbd did not record: whatever nbd device is mounted there.
  const mounted = readMounts(roots).filter((m) => m.mountPoint === path);
  for (const m of mounted.reverse()) {
    const s = states.find((st) => deviceMounts(st.index, roots, [m]).length > 0);
    if (s) return s;
  }
  const byImage = states.filter((s) => s.image === path);
  if (byImage.length === 1) return byImage[0]!;
  if (byImage.length > 1) {
    throw new UsageError(`${target} is attached ${byImage.length} times (${byImage.map((s) => s.device).join(', ')}): name the device`);
  }
  throw new NotAttachedError(`${target} is not an attached device, a mount point of one, or an attached image`);
}

/** Why detaching `state` now would pull the device from under someone; empty when it would not. */
export async function findBlockers(state: DeviceState, roots: SysRoots = SYSTEM_ROOTS): Promise<string[]> {
  const reasons: string[] = [];
  const ours = state.mountpoint;
  const mounts = deviceMounts(state.index, roots);
  let ourMountPresent = false;
  for (const m of mounts) {
    if (ours !== null && m.mountPoint === ours && !ourMountPresent) {
      ourMountPresent = true;
      continue;
    }
    reasons.push(`mounted on ${m.mountPoint} (${m.fstype}), not by imgbd`);
  }
  const holders = deviceHolders(state.index, roots);
  if (holders.length > 0) reasons.push(`held by ${holders.join(', ')}`);
  const others = deviceOpeners(state.index, roots).filter((o) => o.pid !== state.pid && o.pid !== process.pid);
  for (const o of others) reasons.push(`open by pid ${o.pid} (${o.path})`);
  // An exclusive claim we cannot see otherwise (a mount in another namespace, a holder that
  // does not register): the claim our own mount makes is expected.
  if (reasons.length === 0 && !ourMountPresent && deviceConnected(state.index, roots)) {
    try {
      const h = await open(state.device, fsc.O_RDONLY | fsc.O_EXCL | fsc.O_NONBLOCK);
      await h.close();
    } catch (e) {
      if ((e as { code?: string }).code === 'EBUSY') reasons.push('opened exclusively by another user');
    }
  }
  return reasons;
}

export interface DetachOptions {
  readonly force?: boolean;
  readonly runDir: string;
  readonly timeoutMs?: number;
  readonly roots?: SysRoots;
}

export interface DetachResult {
  readonly device: string;
  /** 'supervisor': it tore the device down; 'direct': it was gone and we did. */
  readonly how: 'supervisor' | 'direct';
  /** The device is still held (forced past a foreign mount) and stays until released. */
  readonly stillHeld: boolean;
}

const DEFAULT_DETACH_TIMEOUT_MS = 60_000;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Disconnected, not configured, size 0: the device can be attached again. */
export function deviceReleased(index: number, roots: SysRoots = SYSTEM_ROOTS): boolean {
  return !deviceConnected(index, roots) && (deviceSizeBytes(index, roots) ?? 0) === 0;
}

async function waitUntil(cond: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) return false;
    await sleep(50);
  }
  return true;
}

export async function detachDevice(state: DeviceState, opts: DetachOptions): Promise<DetachResult> {
  const roots = opts.roots ?? SYSTEM_ROOTS;
  const timeoutMs = opts.timeoutMs ?? DEFAULT_DETACH_TIMEOUT_MS;
  const blockers = await findBlockers(state, roots);
  if (blockers.length > 0 && !opts.force) throw new DeviceBusyError(state.device, blockers);
  const foreign = blockers.some((b) => b.startsWith('mounted') || b.startsWith('held') || b.startsWith('open'));

  if (supervisorAlive(state.pid, roots)) {
    process.kill(state.pid, 'SIGTERM');
    // Identified as our supervisor above; now wait for the process itself to be gone.
    const gone = await waitUntil(() => !processRunning(state.pid, roots), timeoutMs);
    if (!gone) throw new ImgbdError('ERR_DETACH_TIMEOUT', `the supervisor (pid ${state.pid}) of ${state.device} did not exit within ${timeoutMs} ms; see ${state.log}`);
    const released = foreign || (await waitUntil(() => deviceReleased(state.index, roots), timeoutMs));
    if (!released) throw new ImgbdError('ERR_DETACH_TIMEOUT', `${state.device} was not released within ${timeoutMs} ms`);
    // The supervisor removes its state on a clean exit; a failed teardown may have left it.
    removeDeviceState(opts.runDir, state.index, state.pid);
    return { device: state.device, how: 'supervisor', stillHeld: foreign };
  }
  await reclaimDevice(state, { ...opts, force: opts.force ?? false }, roots);
  const released = foreign || (await waitUntil(() => deviceReleased(state.index, roots), timeoutMs));
  if (!released) throw new ImgbdError('ERR_DETACH_TIMEOUT', `${state.device} was not released within ${timeoutMs} ms`);
  return { device: state.device, how: 'direct', stillHeld: foreign };
}

/** Do a dead supervisor's teardown: disconnect, unmount what it mounted, forget it. */
async function reclaimDevice(state: DeviceState, opts: DetachOptions & { force: boolean }, roots: SysRoots): Promise<void> {
  if (deviceConnected(state.index, roots)) await disconnectDevice(state.index, state.interface);
  if (state.mountpoint !== null && deviceMounts(state.index, roots).some((m) => m.mountPoint === state.mountpoint)) {
    try {
      await unmountFilesystem(state.mountpoint, opts.force ? MNT_DETACH : 0);
    } catch (e) {
      if ((e as { code?: string }).code !== 'EBUSY') throw e;
      // Busy: files are open on it. The device is already disconnected, so detach the mount
      // lazily; its users get EIO and the device is released when they close.
      await unmountFilesystem(state.mountpoint, MNT_DETACH);
    }
  }
  removeDeviceState(opts.runDir, state.index, state.pid);
}

export interface GcResult {
  readonly reclaimed: string[];
  readonly failed: Array<{ readonly device: string; readonly error: Error }>;
}

/** Reclaim every device whose supervisor is gone. */
export async function collectGarbage(opts: DetachOptions): Promise<GcResult> {
  const roots = opts.roots ?? SYSTEM_ROOTS;
  const reclaimed: string[] = [];
  const failed: Array<{ device: string; error: Error }> = [];
  for (const state of listDeviceStates(opts.runDir).states) {
    if (supervisorAlive(state.pid, roots)) continue;
    try {
      await reclaimDevice(state, { ...opts, force: true }, roots);
      if (!(await waitUntil(() => deviceReleased(state.index, roots), opts.timeoutMs ?? DEFAULT_DETACH_TIMEOUT_MS))) {
        throw new ImgbdError('ERR_DETACH_TIMEOUT', `${state.device} is still held after reclaiming it`);
      }
      reclaimed.push(state.device);
    } catch (e) {
      failed.push({ device: state.device, error: e as Error });
    }
  }
  return { reclaimed, failed };
}
