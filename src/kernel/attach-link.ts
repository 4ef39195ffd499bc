// Handing connected sockets to the kernel so /dev/nbdN appears: through the nbd generic
// netlink family when the kernel has it (the kernel picks a free device: no race with other
// attaches), else through the old ioctl interface (we pick the device under a lock).
//
// Either way the caller gets the device open: with DISCONNECT_ON_CLOSE the kernel disconnects
// when the last opener closes, so the supervisor holds this fd for the device's lifetime and
// a dead supervisor cannot leave the device connected once nothing else uses it.

import { open, type FileHandle } from 'node:fs/promises';
import { constants as fsc, openSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { ImgbdError } from '../errors.js';
import { flockWait, LOCK_EX, LOCK_UN, tryFlock } from '../sys/flock.js';
import {
  ioctlIntAsync,
  ioctlIntSync,
  NBD_CLEAR_SOCK,
  NBD_DISCONNECT,
  NBD_DO_IT,
  NBD_SET_BLKSIZE,
  NBD_SET_FLAGS,
  NBD_SET_SIZE_BLOCKS,
  NBD_SET_SOCK,
  NBD_SET_TIMEOUT,
} from '../sys/ioctl-nbd.js';
import { chooseFreeDevice, deviceConnected, SYSTEM_ROOTS, type SysRoots } from './device.js';
import { NBD_CFLAG, NbdNetlink } from './nbd-netlink.js';
import { ensureRunDir, type KernelInterface } from './state.js';

export interface KernelLinkConfig {
  /** Kernel ends of connected socketpairs; the caller closes its copies afterwards. */
  readonly socketFds: readonly number[];
  readonly sizeBytes: number;
  readonly blockSizeBytes: number;
  /** NBD transmission flags of the export. */
  readonly serverFlags: number;
  /** Request timeout, and how long to wait for a dead connection to be replaced. */
  readonly timeoutSeconds: number;
  readonly backendIdentifier: string;
  /** Needed by the ioctl interface for its device-choice lock. */
  readonly runDir: string;
}

export interface KernelLink {
  readonly index: number;
  readonly interface: KernelInterface;
  /** /dev/nbd<index>, open for the device's lifetime. */
  readonly handle: FileHandle;
  /** Ask the kernel to disconnect (it sends NBD_CMD_DISC on every connection). */
  disconnect(): Promise<void>;
  /** Release the device fd and the control channel; call after disconnect(). */
  close(): Promise<void>;
}

export class NoFreeDeviceError extends ImgbdError {
  constructor(message: string) {
    super('ERR_NO_FREE_DEVICE', message);
  }
}

/** Connect through netlink; ENOENT from NbdNetlink.open() means the family is missing. */
export async function connectNetlink(cfg: KernelLinkConfig): Promise<KernelLink> {
  const nl = await NbdNetlink.open();
  let index: number;
  try {
    // DISCONNECT_ON_CLOSE is set only once we hold the device open: before that, any short
    // open+close (blkid run by udev on the new disk) would disconnect it under us.
    index = await nl.connect({
      socketFds: cfg.socketFds,
      sizeBytes: cfg.sizeBytes,
      blockSizeBytes: cfg.blockSizeBytes,
      serverFlags: cfg.serverFlags,
      clientFlags: 0,
      timeoutSeconds: cfg.timeoutSeconds,
      deadConnTimeoutSeconds: cfg.timeoutSeconds,
      backendIdentifier: cfg.backendIdentifier,
    });
  } catch (e) {
    nl.close();
    throw e;
  }
  let handle: FileHandle | undefined;
  try {
    // Asynchronous: opening may scan partitions, which reads through this process's server.
    handle = await open(`/dev/nbd${index}`, fsc.O_RDONLY);
    await nl.reconfigure({ index, clientFlags: NBD_CFLAG.DISCONNECT_ON_CLOSE, backendIdentifier: cfg.backendIdentifier });
  } catch (e) {
    await nl.disconnect(index).catch(() => undefined);
    await handle?.close().catch(() => undefined);
    nl.close();
    throw e;
  }
  const h = handle;
  return {
    index,
    interface: 'netlink',
    handle: h,
    disconnect: () => nl.disconnect(index),
    close: async () => {
      await h.close().catch(() => undefined);
      nl.close();
    },
  };
}

const LOCK_TIMEOUT_MS = 60_000;
const DO_IT_START_TIMEOUT_MS = 30_000;

/**
 * Connect through the ioctl interface: pick the lowest device with no client (no
 * /sys/block/nbdN/pid) while holding an exclusive lock that every imgbd attach takes, and
 * release it only once NBD_DO_IT has made the device visibly busy. A device another tool
 * grabs meanwhile answers NBD_SET_SOCK with EBUSY, and the next one is tried.
 */
export async function connectIoctl(cfg: KernelLinkConfig, roots: SysRoots = SYSTEM_ROOTS): Promise<KernelLink> {
  ensureRunDir(cfg.runDir);
  const lockFd = openSync(join(cfg.runDir, 'ioctl-attach.lock'), fsc.O_RDWR | fsc.O_CREAT, 0o600);
  try {
    await flockWait(lockFd, LOCK_EX, LOCK_TIMEOUT_MS);
    const tried = new Set<number>();
    for (;;) {
      const index = chooseFreeDevice(tried, roots);
      if (index === null) throw new NoFreeDeviceError(`no free /dev/nbdN (tried ${[...tried].join(', ') || 'none'}): load nbd with a larger nbds_max`);
      tried.add(index);
      const link = await tryIoctlDevice(index, cfg, roots);
      if (link) return link;
    }
  } finally {
    tryFlock(lockFd, LOCK_UN);
    closeSync(lockFd);
  }
}

async function tryIoctlDevice(index: number, cfg: KernelLinkConfig, roots: SysRoots): Promise<KernelLink | null> {
  const handle = await open(`/dev/nbd${index}`, fsc.O_RDWR);
  const fd = handle.fd;
  try {
    // All configuration from this one thread: the kernel binds an unbound device to the task
    // that configures it and refuses other tasks (EBUSY), which is how a race is detected.
    ioctlIntSync(fd, NBD_SET_BLKSIZE, cfg.blockSizeBytes, 'NBD_SET_BLKSIZE');
    ioctlIntSync(fd, NBD_SET_SIZE_BLOCKS, Math.floor(cfg.sizeBytes / cfg.blockSizeBytes), 'NBD_SET_SIZE_BLOCKS');
    ioctlIntSync(fd, NBD_SET_TIMEOUT, cfg.timeoutSeconds, 'NBD_SET_TIMEOUT');
    ioctlIntSync(fd, NBD_SET_FLAGS, cfg.serverFlags, 'NBD_SET_FLAGS');
    for (const s of cfg.socketFds) ioctlIntSync(fd, NBD_SET_SOCK, s, 'NBD_SET_SOCK');
  } catch (e) {
    await handle.close().catch(() => undefined);
    if ((e as { code?: string }).code === 'EBUSY') return null;
    throw e;
  }
  // NBD_DO_IT returns only when the device is disconnected: it lives on a pool thread.
  let doItSettled = false;
  let doItError: unknown;
  const doIt = ioctlIntAsync(fd, NBD_DO_IT, 0, 'NBD_DO_IT').then(
    () => undefined,
    (e: unknown) => {
      doItError = e;
    },
  );
  void doIt.finally(() => {
    doItSettled = true;
  });
  const deadline = Date.now() + DO_IT_START_TIMEOUT_MS;
  while (!deviceConnected(index, roots)) {
    if (doItSettled) {
      await handle.close().catch(() => undefined);
      if ((doItError as { code?: string } | undefined)?.code === 'EBUSY') return null;
      throw doItError ?? new ImgbdError('ERR_NBD_DO_IT', `NBD_DO_IT on /dev/nbd${index} returned at once`);
    }
    if (Date.now() > deadline) {
      await ioctlIntAsync(fd, NBD_CLEAR_SOCK, 0, 'NBD_CLEAR_SOCK').catch(() => undefined);
      await handle.close().catch(() => undefined);
      throw new ImgbdError('ERR_NBD_DO_IT', `/dev/nbd${index} did not become connected within ${DO_IT_START_TIMEOUT_MS} ms`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    index,
    interface: 'ioctl',
    handle,
    disconnect: async () => {
      await ioctlIntAsync(fd, NBD_DISCONNECT, 0, 'NBD_DISCONNECT');
      await ioctlIntAsync(fd, NBD_CLEAR_SOCK, 0, 'NBD_CLEAR_SOCK').catch(() => undefined);
      await doIt;
    },
    close: async () => {
      await handle.close().catch(() => undefined);
    },
  };
}

export type InterfaceChoice = KernelInterface | 'auto';

/** Netlink when available (or forced), the ioctl interface otherwise. */
export async function connectKernel(cfg: KernelLinkConfig, choice: InterfaceChoice = 'auto'): Promise<KernelLink> {
  if (choice === 'ioctl') return connectIoctl(cfg);
  try {
    return await connectNetlink(cfg);
  } catch (e) {
    // No "nbd" generic netlink family: a kernel older than 4.12.
    if (choice === 'auto' && (e as { code?: string }).code === 'ENOENT') return connectIoctl(cfg);
    throw e;
  }
}

/**
 * Disconnect a device whose server is gone (detach/gc): netlink DISCONNECT, or the ioctl
 * pair NBD_DISCONNECT + NBD_CLEAR_SOCK when the family is missing. A device with no
 * connection left is not an error.
 */
export async function disconnectDevice(index: number, iface: KernelInterface): Promise<void> {
  if (iface === 'netlink') {
    let nl: NbdNetlink | undefined;
    try {
      nl = await NbdNetlink.open();
    } catch (e) {
      if ((e as { code?: string }).code !== 'ENOENT') throw e;
    }
    if (nl) {
      try {
        await nl.disconnect(index);
        return;
      } catch (e) {
        const code = (e as { code?: string }).code;
        // EINVAL: "not configured" — nothing to disconnect.
        if (code === 'EINVAL' || code === 'ENOENT') return;
        throw e;
      } finally {
        nl.close();
      }
    }
  }
  const handle = await open(`/dev/nbd${index}`, fsc.O_RDONLY);
  try {
    await ioctlIntAsync(handle.fd, NBD_DISCONNECT, 0, 'NBD_DISCONNECT').catch(() => undefined);
    await ioctlIntAsync(handle.fd, NBD_CLEAR_SOCK, 0, 'NBD_CLEAR_SOCK').catch(() => undefined);
  } finally {
    await handle.close();
  }
}
