// The attach supervisor: serves one image to /dev/nbdN from this process, and is the only
// thing that tears the device down. Startup: open the image (and the selected partition
// through the offset filter), socketpairs into the in-process NBD server, hand the kernel
// ends over (attach-link.ts), wait until the device and its partition nodes exist, mount if
// asked, record the state file. Shutdown, on SIGTERM/SIGHUP/SIGINT, on exit of the watched
// process, or when the kernel drops the device: unmount what we mounted, flush, disconnect,
// exit — in that order, so no data is in flight when the device goes.

import { renameSync } from 'node:fs';
import { Backend } from '../block/backend.js';
import type { BlockDevice } from '../block/device.js';
import { offsetFilter } from '../block/filters/offset.js';
import { ImgbdError, UsageError } from '../errors.js';
import { openImageWithFormat } from '../formats/open.js';
import { probeMountableFilesystem } from '../fs/probe.js';
import { findPartition, readPartitions } from '../partition/table.js';
import { NBD_FLAG_CAN_MULTI_CONN } from '../protocol/constants.js';
import { DEFAULT_CONNECTION_LIMITS } from '../server/connection.js';
import { connectionFlags, serveExport } from '../server/exports.js';
import type { Logger } from '../server/logger.js';
import { NbdServer } from '../server/server.js';
import { rereadPartitions } from '../sys/ioctl-nbd.js';
import { MNT_DETACH, mountFilesystem, parseMountOptions, unmountFilesystem } from '../sys/mount.js';
import { watchProcess, type ProcessWatch } from '../sys/pidfd.js';
import { setIoFlusher, setOomScoreAdj } from '../sys/prctl.js';
import { closeFd, nbdSocketPair } from '../sys/socket.js';
import { connectKernel, type KernelLink } from './attach-link.js';
import { nbdMaxPart } from './device.js';
import { waitForDeviceReady } from './supervisor-ready.js';
import type { AttachInfo, SupervisorConfig } from './supervisor-protocol.js';
import { logPath, removeDeviceState, STATE_VERSION, writeDeviceState } from './state.js';

const READY_TIMEOUT_MS = 30_000;
const UNMOUNT_BUSY_RETRY_MS = 3_000;
const DRAIN_TIMEOUT_MS = 5_000;

function describePartition(p: SupervisorConfig['partition']): string {
  if (p === null) return '';
  return typeof p === 'number' ? `:${p}` : `:name=${p.name}`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export class Supervisor {
  private readonly cfg: SupervisorConfig;
  private readonly log: Logger;
  private image: BlockDevice | undefined;
  private server: NbdServer | undefined;
  private link: KernelLink | undefined;
  private served: Promise<void>[] = [];
  private mounted: string | null = null;
  private watch: ProcessWatch | undefined;
  private info: AttachInfo | undefined;
  private stopping: Promise<void> | undefined;
  private started = false;
  private stopReason: string | undefined;
  private resolveStopped!: (reason: string) => void;
  /** Resolves with the reason once shutdown has finished. */
  readonly stopped: Promise<string>;

  constructor(cfg: SupervisorConfig, log: Logger) {
    this.cfg = cfg;
    this.log = log;
    this.stopped = new Promise((r) => (this.resolveStopped = r));
  }

  /** Harden the process: it must never be throttled by, or killed for, the I/O it serves. */
  private harden(): void {
    try {
      setIoFlusher();
    } catch (e) {
      this.log.warn(`PR_SET_IO_FLUSHER: ${(e as Error).message}`);
    }
    try {
      setOomScoreAdj(-1000);
    } catch (e) {
      this.log.warn(`oom_score_adj: ${(e as Error).message}`);
    }
  }

  /** Everything up to a usable device. On failure, whatever was set up is torn down first. */
  async start(): Promise<AttachInfo> {
    this.harden();
    let info: AttachInfo;
    try {
      info = await this.setUp();
    } catch (e) {
      await this.tearDown().catch((t: unknown) => this.log.error(`cleanup after a failed start: ${(t as Error).message}`));
      this.resolveStopped(`start failed: ${(e as Error).message}`);
      throw e;
    }
    this.started = true;
    this.info = info;
    if (this.stopReason !== undefined) {
      // A signal arrived while starting: the full shutdown, then report that nothing is attached.
      await this.stop(this.stopReason);
      throw new ImgbdError('ERR_SUPERVISOR_STOPPED', `stopped during startup (${this.stopReason})`);
    }
    return info;
  }

  private async setUp(): Promise<AttachInfo> {
    const cfg = this.cfg;
    const opened = await openImageWithFormat(cfg.image, {
      format: cfg.format,
      readOnly: cfg.readOnly,
      ...(cfg.allowBacking !== undefined && { allowBacking: cfg.allowBacking }),
    });
    this.image = opened.device;
    let exported: BlockDevice = opened.device;
    if (cfg.partition !== null) {
      const { partition } = await findPartition(opened.device, cfg.partition);
      exported = offsetFilter(opened.device, { offsetBytes: partition.startBytes, sizeBytes: partition.sizeBytes });
      this.log.info(`exporting partition ${partition.number}: ${partition.sizeBytes} bytes at ${partition.startBytes}`);
    }
    const what = `${cfg.image}${describePartition(cfg.partition)}`;
    if (cfg.mount && cfg.partition === null) {
      const table = await readPartitions(exported).catch(() => null);
      if (table && table.partitions.length > 0) {
        throw new UsageError(`${cfg.image} has a ${table.scheme.toUpperCase()} partition table: to mount, attach one partition (${cfg.image}:N)`);
      }
    }
    const fstype = cfg.mount ? (await probeMountableFilesystem(exported, what)).type : null;
    const mountOpts = cfg.mount ? parseMountOptions(cfg.mount.options, cfg.readOnly) : null;

    const backend = new Backend(exported, { readOnly: cfg.readOnly });
    const exportCfg = { name: '', device: backend, readOnly: cfg.readOnly };
    const flags = connectionFlags(serveExport(exportCfg, DEFAULT_CONNECTION_LIMITS.maxPayloadBytes), false);
    if (cfg.connections > 1 && (flags & NBD_FLAG_CAN_MULTI_CONN) === 0) {
      throw new UsageError(`${what} cannot be served over ${cfg.connections} connections: its ${opened.format} driver does not allow multi-conn`);
    }
    const minimum = backend.blockSizes().minimum;
    const blockSizeBytes = Math.min(4096, Math.max(512, minimum));
    this.server = new NbdServer({ exports: [exportCfg], logger: this.log, ...(cfg.pollMaxUs !== undefined && { pollMaxUs: cfg.pollMaxUs }) });

    const kernelFds: number[] = [];
    try {
      for (let i = 0; i < cfg.connections; i++) {
        const [userFd, kernelFd] = nbdSocketPair();
        kernelFds.push(kernelFd);
        this.served.push(this.server.serveTransmission(userFd, '', { structuredReplies: false }));
      }
      this.link = await connectKernel(
        {
          socketFds: kernelFds,
          sizeBytes: exported.sizeBytes,
          blockSizeBytes,
          serverFlags: flags,
          timeoutSeconds: cfg.timeoutSeconds,
          backendIdentifier: `imgbd:${cfg.image}`,
          runDir: cfg.runDir,
        },
        cfg.interface,
      );
    } finally {
      // The kernel holds its own references to the sockets.
      for (const fd of kernelFds) closeFd(fd);
    }
    const index = this.link.index;
    const device = `/dev/nbd${index}`;
    this.log.info(`connected ${device} through ${this.link.interface} (${cfg.connections} connection(s), flags 0x${flags.toString(16)})`);
    const log = logPath(cfg.runDir, index);
    try {
      renameSync(cfg.logFile, log);
    } catch (e) {
      this.log.warn(`renaming the log to ${log}: ${(e as Error).message}`);
    }
    // Kernel disconnects (nbd-client -d, a dead link) end the supervisor too.
    this.server.on('idle', () => void this.stop('the kernel closed every connection'));

    const expected = await this.expectedPartitions(exported);
    if (expected.length > 0) {
      try {
        await rereadPartitions(this.link.handle.fd);
      } catch (e) {
        this.log.warn(`BLKRRPART on ${device}: ${(e as Error).message}`);
      }
    }
    const partitions = await waitForDeviceReady({ index, sizeBytes: exported.sizeBytes, partitions: expected, timeoutMs: READY_TIMEOUT_MS });

    if (cfg.mount && fstype && mountOpts) {
      await mountFilesystem(device, cfg.mount.dir, fstype, mountOpts);
      this.mounted = cfg.mount.dir;
      this.log.info(`mounted ${device} (${fstype}) on ${cfg.mount.dir}`);
    }

    const info: AttachInfo = {
      device,
      index,
      image: cfg.image,
      format: opened.format,
      partition: cfg.partition,
      supervisorPid: process.pid,
      mountpoint: this.mounted,
      fstype,
      partitions: partitions.map((p) => ({ number: p.number, device: `/dev/${p.name}`, sizeBytes: p.sizeBytes })),
      sizeBytes: exported.sizeBytes,
      connections: cfg.connections,
      interface: this.link.interface,
      log,
    };
    writeDeviceState(cfg.runDir, {
      version: STATE_VERSION,
      index,
      device,
      image: cfg.image,
      format: opened.format,
      partition: cfg.partition,
      readOnly: cfg.readOnly,
      pid: process.pid,
      mountpoint: this.mounted,
      connections: cfg.connections,
      created: new Date().toISOString(),
      interface: this.link.interface,
      backend: `imgbd:${cfg.image}`,
      log,
    });
    if (cfg.watchPid !== undefined) {
      this.watch = watchProcess(cfg.watchPid);
      this.log.info(`watching pid ${cfg.watchPid} (${this.watch.mechanism})`);
      void this.watch.exited.then(() => this.stop(`watched process ${cfg.watchPid} exited`));
    }
    return info;
  }

  /** Partition numbers the kernel will create for the whole image (none for one partition, or max_part=0). */
  private async expectedPartitions(exported: BlockDevice): Promise<number[]> {
    if (this.cfg.partition !== null) return [];
    const maxPart = nbdMaxPart();
    if (maxPart === 0) return [];
    try {
      const table = await readPartitions(exported);
      return table.partitions.map((p) => p.number).filter((n) => n <= maxPart);
    } catch (e) {
      this.log.warn(`reading the partition table: ${(e as Error).message}`);
      return [];
    }
  }

  /** Begin shutdown (idempotent); `stopped` resolves when it is done. */
  stop(reason: string): Promise<void> {
    if (!this.started) {
      this.stopReason ??= reason;
      return Promise.resolve();
    }
    this.stopping ??= (async () => {
      this.log.info(`stopping: ${reason}`);
      try {
        await this.tearDown();
      } catch (e) {
        this.log.error(`shutdown: ${(e as Error).message}`);
      }
      this.resolveStopped(reason);
    })();
    return this.stopping;
  }

  private async unmount(dir: string): Promise<void> {
    const deadline = Date.now() + UNMOUNT_BUSY_RETRY_MS;
    for (;;) {
      try {
        await unmountFilesystem(dir);
        this.log.info(`unmounted ${dir}`);
        return;
      } catch (e) {
        const code = (e as { code?: string }).code;
        if (code === 'EINVAL' || code === 'ENOENT') return; // no longer mounted
        if (code !== 'EBUSY' || Date.now() > deadline) {
          // Detach it so the device can go once the last user lets go of it.
          this.log.warn(`unmounting ${dir}: ${(e as Error).message}; detaching it lazily`);
          await unmountFilesystem(dir, MNT_DETACH).catch((d: unknown) => this.log.error(`lazy unmount of ${dir}: ${(d as Error).message}`));
          return;
        }
        await sleep(100);
      }
    }
  }

  /** Unmount, flush, disconnect, release; each step runs even when an earlier one failed. */
  private async tearDown(): Promise<void> {
    this.watch?.stop();
    if (this.mounted !== null) {
      await this.unmount(this.mounted);
      this.mounted = null;
    }
    const link = this.link;
    if (link) {
      try {
        // fsync of the block device writes back its page cache and sends NBD_CMD_FLUSH.
        await link.handle.sync();
      } catch (e) {
        this.log.warn(`flushing /dev/nbd${link.index}: ${(e as Error).message}`);
      }
      try {
        await link.disconnect();
      } catch (e) {
        this.log.warn(`disconnecting /dev/nbd${link.index}: ${(e as Error).message}`);
      }
      // The kernel lets go of its socket ends only when the device's last opener closes it:
      // close ours first, then the connections end (requests already received still finish
      // and are flushed by server.close()).
      await link.close();
      const drained = await Promise.race([Promise.allSettled(this.served).then(() => true), sleep(DRAIN_TIMEOUT_MS).then(() => false)]);
      if (!drained) this.log.warn(`connections still open ${DRAIN_TIMEOUT_MS} ms after the disconnect; closing them`);
    }
    if (this.server) await this.server.close();
    if (this.image) await this.image.close();
    if (link) removeDeviceState(this.cfg.runDir, link.index, process.pid);
    this.link = undefined;
    this.server = undefined;
    this.image = undefined;
  }

  get attachInfo(): AttachInfo | undefined {
    return this.info;
  }
}
