// qemu-nbd's -c and -d, for tools that drive it (LXC's nbd backend): serve an image on a
// *named* /dev/nbdN from this process, in the foreground, until the device is disconnected;
// and disconnect a device from outside, waiting until the kernel has released it.
//
// Unlike `imgbd attach` (supervisor.ts) the caller picks the device, nothing is recorded in
// the run directory (so `imgbd gc` never takes such a device for an orphan), and the process
// may run inside a pid namespace of the caller's (LXC clones one for it). Connecting goes
// through the nbd generic netlink family (Linux 4.12+), which takes the index.
//
// Ordering on disconnect, whoever asks: the disconnecting side flushes the device first
// (NBD_CMD_FLUSH reaches the image driver, which makes its data and metadata durable), so
// that even a serving process killed right after the disconnect leaves a consistent image.

import { constants as fsc } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { Backend } from '../block/backend.js';
import { ImgbdError, UsageError } from '../errors.js';
import { openImageWithFormat } from '../formats/open.js';
import { readPartitions } from '../partition/table.js';
import { DEFAULT_CONNECTION_LIMITS } from '../server/connection.js';
import { connectionFlags, serveExport } from '../server/exports.js';
import type { Logger } from '../server/logger.js';
import { NbdServer } from '../server/server.js';
import { rereadPartitions } from '../sys/ioctl-nbd.js';
import { closeFd, nbdSocketPair } from '../sys/socket.js';
import { disconnectDevice } from './attach-link.js';
import { deviceReleased } from './attach-detach.js';
import { deviceConnected, deviceExists, nbdMaxPart } from './device.js';
import { NBD_CFLAG, NbdNetlink } from './nbd-netlink.js';
import { waitForDeviceReady } from './supervisor-ready.js';

export interface ServeOnDeviceOptions {
  readonly image: string;
  readonly index: number;
  readonly format?: string;
  readonly readOnly: boolean;
  readonly log: Logger;
  readonly timeoutSeconds?: number;
  readonly readyTimeoutMs?: number;
}

const DEFAULT_TIMEOUT_SECONDS = 30;
const DEFAULT_READY_TIMEOUT_MS = 30_000;
const DRAIN_TIMEOUT_MS = 10_000;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export class DeviceServer {
  private stopping: Promise<void> | undefined;
  private resolveDone!: (reason: string) => void;
  /** Resolves with the reason once the device is disconnected and everything is closed. */
  readonly done: Promise<string>;

  private constructor(
    readonly index: number,
    private readonly server: NbdServer,
    private readonly served: Promise<void>,
    private readonly nl: NbdNetlink,
    private readonly handle: FileHandle,
    private readonly closeImage: () => Promise<void>,
    private readonly log: Logger,
  ) {
    this.done = new Promise((r) => (this.resolveDone = r));
    // The kernel closes the connection when anyone disconnects the device (qemu-nbd -d).
    server.on('idle', () => void this.stop('the device was disconnected'));
  }

  /** Connect `opts.image` to /dev/nbd<index> and wait until it and its partition nodes are usable. */
  static async start(opts: ServeOnDeviceOptions): Promise<DeviceServer> {
    const device = `/dev/nbd${opts.index}`;
    if (!deviceExists(opts.index)) throw new UsageError(`${device} does not exist (modprobe nbd?)`);
    if (deviceConnected(opts.index)) throw new ImgbdError('EBUSY', `${device} is already connected`);
    const opened = await openImageWithFormat(opts.image, { readOnly: opts.readOnly, ...(opts.format !== undefined && { format: opts.format }) });
    const backend = new Backend(opened.device, { readOnly: opts.readOnly });
    const exportCfg = { name: '', device: backend, readOnly: opts.readOnly };
    const flags = connectionFlags(serveExport(exportCfg, DEFAULT_CONNECTION_LIMITS.maxPayloadBytes), false);
    const server = new NbdServer({ exports: [exportCfg], logger: opts.log });
    const closeAll = async () => {
      await server.close().catch(() => undefined);
      await opened.device.close().catch(() => undefined);
    };
    let nl: NbdNetlink | undefined;
    let handle: FileHandle | undefined;
    let connected = false;
    try {
      const [userFd, kernelFd] = nbdSocketPair();
      const served = server.serveTransmission(userFd, '', { structuredReplies: false });
      try {
        nl = await NbdNetlink.open();
        const timeoutSeconds = opts.timeoutSeconds ?? DEFAULT_TIMEOUT_SECONDS;
        await nl.connect({
          index: opts.index,
          socketFds: [kernelFd],
          sizeBytes: opened.device.sizeBytes,
          blockSizeBytes: Math.min(4096, Math.max(512, backend.blockSizes().minimum)),
          serverFlags: flags,
          clientFlags: 0,
          timeoutSeconds,
          deadConnTimeoutSeconds: timeoutSeconds,
          backendIdentifier: `imgbd-qemu-nbd:${opts.image}`,
        });
        connected = true;
      } finally {
        closeFd(kernelFd);
      }
      // Opening scans the partition table through our own server: never synchronously.
      handle = await open(device, fsc.O_RDONLY);
      // From here a dead server process cannot leave the device connected once nobody uses it.
      await nl.reconfigure({ index: opts.index, clientFlags: NBD_CFLAG.DISCONNECT_ON_CLOSE, backendIdentifier: `imgbd-qemu-nbd:${opts.image}` });
      const maxPart = nbdMaxPart();
      const table = maxPart > 0 ? await readPartitions(backend).catch(() => null) : null;
      const expected = (table?.partitions ?? []).map((p) => p.number).filter((n) => n <= maxPart);
      if (expected.length > 0) await rereadPartitions(handle.fd).catch((e: unknown) => opts.log.warn(`BLKRRPART on ${device}: ${(e as Error).message}`));
      await waitForDeviceReady({ index: opts.index, sizeBytes: opened.device.sizeBytes, partitions: expected, timeoutMs: opts.readyTimeoutMs ?? DEFAULT_READY_TIMEOUT_MS });
      opts.log.info(`serving ${opts.image} (${opened.format}) on ${device}`);
      return new DeviceServer(opts.index, server, served, nl, handle, () => opened.device.close(), opts.log);
    } catch (e) {
      if (connected) await nl?.disconnect(opts.index).catch(() => undefined);
      await handle?.close().catch(() => undefined);
      nl?.close();
      await closeAll();
      if ((e as { code?: string }).code === 'EBUSY') throw new ImgbdError('EBUSY', `${device} is busy (connected by someone else)`, { cause: e });
      throw e;
    }
  }

  /** Flush, disconnect (if still connected), close; idempotent. */
  stop(reason: string): Promise<void> {
    this.stopping ??= (async () => {
      this.log.info(`stopping: ${reason}`);
      try {
        await this.handle.sync();
      } catch {
        // Already disconnected: whoever disconnected flushed first.
      }
      await this.nl.disconnect(this.index).catch(() => undefined);
      await Promise.race([this.served.catch(() => undefined), sleep(DRAIN_TIMEOUT_MS)]);
      await this.handle.close().catch(() => undefined);
      this.nl.close();
      await this.server.close().catch(() => undefined);
      await this.closeImage().catch((e: unknown) => this.log.error(`closing the image: ${(e as Error).message}`));
      this.resolveDone(reason);
    })();
    return this.stopping;
  }
}

/**
 * qemu-nbd -d: flush /dev/nbd<index>, disconnect it, and wait until the kernel has released
 * it (its server has closed the device). Not connected is not an error, as for qemu-nbd.
 */
export async function disconnectAndWait(index: number, timeoutMs: number, log: Logger): Promise<void> {
  const device = `/dev/nbd${index}`;
  if (!deviceExists(index)) throw new UsageError(`${device} does not exist`);
  if (!deviceConnected(index)) return;
  try {
    const h = await open(device, fsc.O_RDONLY);
    try {
      await h.sync();
    } finally {
      await h.close();
    }
  } catch (e) {
    log.warn(`flushing ${device}: ${(e as Error).message}`);
  }
  await disconnectDevice(index, 'netlink');
  const deadline = Date.now() + timeoutMs;
  while (!deviceReleased(index)) {
    if (Date.now() > deadline) throw new ImgbdError('ERR_DETACH_TIMEOUT', `${device} was disconnected but not released within ${timeoutMs} ms`);
    await sleep(50);
  }
}
