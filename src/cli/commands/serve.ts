// imgbd serve: qemu-nbd's server role, on a unix socket by default.

import { spawn } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { basename, join, resolve } from 'node:path';
import type { BlockDevice } from '../../block/device.js';
import { openOverlay } from '../../block/filters/overlay.js';
import { offsetFilter } from '../../block/filters/offset.js';
import { UsageError } from '../../errors.js';
import { openImageWithFormat } from '../../formats/open.js';
import { RawDevice } from '../../formats/raw/driver.js';
import { listenInherited, listenTcp, listenUnix, NBD_DEFAULT_PORT, type Listener } from '../../server/listen.js';
import type { Logger } from '../../server/logger.js';
import type { TlsMode } from '../../server/negotiation.js';
import { defaultPollMaxUs, MAX_POLL_US } from '../../server/idle-poller.js';
import { NbdServer } from '../../server/server.js';
import { loadPsk, loadX509Dir, type TlsCredentials } from '../../server/tls.js';
import { parseCount, parseSize } from '../parse.js';
import type { RawReopen } from '../serve-lane.js';
import { siblingModule } from '../../util/start-worker.js';

interface ServeOptions {
  format?: string;
  readOnly?: boolean;
  exportName?: string[];
  description?: string[];
  socket?: string;
  port?: string;
  bind?: string;
  shared?: string;
  persistent?: boolean;
  snapshot?: boolean;
  offset?: string;
  size?: string;
  tls: string;
  tlsCertificates?: string;
  tlsVerifyPeer?: boolean;
  tlsPsk?: string;
  handshakeTimeout: string;
  pollMaxUs?: string;
  threads?: string;
  fork?: boolean;
  pidFile?: string;
  verbose?: boolean;
  loadSnapshot?: string;
  allowBacking?: string[];
}

const FORK_ENV = 'IMGBD_SERVE_FORKED';

function stderrLogger(verbose: boolean): Logger {
  const line = (level: string, m: string): void => {
    process.stderr.write(`imgbd serve: ${level}${m}\n`);
  };
  return {
    info: (m) => verbose && line('', m),
    warn: (m) => line('warning: ', m),
    error: (m) => line('error: ', m),
  };
}

function defaultSocketPath(): string {
  const dir = process.getuid?.() === 0 ? '/run/imgbd' : (process.env.XDG_RUNTIME_DIR ?? tmpdir());
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  return join(dir, `serve-${process.pid}.sock`);
}

function tlsConfig(o: ServeOptions): { mode: TlsMode; credentials?: TlsCredentials } | undefined {
  const mode = o.tls as TlsMode;
  if (!['off', 'on', 'require'].includes(mode)) throw new UsageError(`--tls must be off, on or require, not '${o.tls}'`);
  if (mode === 'off') {
    if (o.tlsCertificates || o.tlsPsk) throw new UsageError('--tls-certificates/--tls-psk need --tls=on or --tls=require');
    return undefined;
  }
  if (Boolean(o.tlsCertificates) === Boolean(o.tlsPsk)) {
    throw new UsageError(`--tls=${mode} needs exactly one of --tls-certificates DIR or --tls-psk FILE`);
  }
  const credentials = o.tlsCertificates ? loadX509Dir(o.tlsCertificates, o.tlsVerifyPeer ?? false) : loadPsk(o.tlsPsk!);
  return { mode, credentials };
}

interface ExportDevice {
  readonly device: BlockDevice;
  /** How a connection thread opens the same image (serve-lane.ts); absent when it cannot. */
  readonly reopen?: RawReopen;
}

async function openExportDevice(path: string, o: ServeOptions): Promise<ExportDevice> {
  const readOnly = ((o.readOnly ?? false) || o.loadSnapshot !== undefined) && !o.snapshot;
  const extra = {
    ...(o.loadSnapshot !== undefined ? { snapshot: o.loadSnapshot } : {}),
    ...(o.allowBacking !== undefined && o.allowBacking.length > 0 ? { allowBacking: o.allowBacking } : {}),
  };
  const opened = await openImageWithFormat(path, { format: o.format, readOnly: o.snapshot || o.loadSnapshot !== undefined ? true : readOnly, ...extra });
  if (o.loadSnapshot !== undefined && opened.format !== 'qcow2') {
    await opened.device.close();
    throw new UsageError(`-l loads a qcow2 internal snapshot, but ${path} is ${opened.format}`);
  }
  let dev = opened.device;
  let window: RawReopen['window'];
  if (o.offset !== undefined || o.size !== undefined) {
    const offsetBytes = o.offset !== undefined ? parseSize(o.offset, 'offset') : 0;
    const sizeBytes = o.size !== undefined ? parseSize(o.size, 'size') : undefined;
    dev = offsetFilter(dev, { offsetBytes, sizeBytes });
    window = sizeBytes === undefined ? { offsetBytes } : { offsetBytes, sizeBytes };
  }
  // An overlay's map lives in this thread's memory: its image cannot be served from another.
  if (o.snapshot) return { device: await openOverlay(dev, {}) };
  if (!(opened.device instanceof RawDevice)) return { device: dev };
  const reopen: RawReopen = { fd: opened.device.descriptor, readOnly, probedRaw: opened.probed, ...(window && { window }) };
  return { device: dev, reopen };
}

/** --threads: how many threads besides the main one serve connections. */
function laneThreads(o: ServeOptions, maxConnections: number): number {
  if (o.threads !== undefined) return parseCount(o.threads, '--threads', 1, 256) - 1;
  // One client needs no second thread, nor do more than the cores can run at once.
  return Math.max(0, Math.min(availableParallelism(), maxConnections) - 1);
}

/** --fork: run the server as a detached child and return once it reports that it listens. */
function forkAndWait(args: string[]): Promise<number> {
  return new Promise((resolvePromise) => {
    const child = spawn(process.execPath, [process.argv[1]!, 'serve', ...args], {
      detached: true,
      stdio: ['ignore', 'pipe', 'inherit'],
      env: { ...process.env, [FORK_ENV]: '1' },
    });
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('\n')) {
        process.stdout.write(out);
        child.stdout!.destroy();
        child.unref();
        resolvePromise(0);
      }
    });
    child.on('exit', (code) => resolvePromise(code ?? 1));
  });
}

export async function run(images: string[], opts: Record<string, unknown>): Promise<number> {
  const o = opts as unknown as ServeOptions;
  if (o.fork && process.env[FORK_ENV] !== '1') {
    return forkAndWait(process.argv.slice(process.argv.indexOf('serve') + 1).filter((a) => a !== '--fork'));
  }
  const names = o.exportName ?? [];
  const descriptions = o.description ?? [];
  if (names.length > images.length) throw new UsageError(`${names.length} export names (-x) for ${images.length} image(s)`);
  if (images.length > 1 && names.length !== images.length) {
    throw new UsageError('several images need one -x NAME each, in the same order');
  }
  if (o.socket && (o.port || o.bind)) throw new UsageError('use either -k SOCKET or -p PORT/-b ADDR, not both');
  const maxConnections = o.shared === undefined ? 1 : parseCount(o.shared, '--shared', 0) || Number.POSITIVE_INFINITY;
  const handshakeTimeoutMs = parseCount(o.handshakeTimeout, '--handshake-timeout', 1, 3600) * 1000;
  if (o.loadSnapshot !== undefined && o.format !== undefined && o.format !== 'qcow2') throw new UsageError(`-l loads a qcow2 internal snapshot; -f ${o.format} images have none`);
  const tls = tlsConfig(o);
  const threads = laneThreads(o, maxConnections);
  const logger = stderrLogger(o.verbose ?? false);

  const opened: ExportDevice[] = [];
  try {
    for (const image of images) opened.push(await openExportDevice(image, o));
  } catch (e) {
    await Promise.allSettled(opened.map((d) => d.device.close()));
    throw e;
  }
  const devices = opened.map((d) => d.device);
  const server = new NbdServer({
    exports: images.map((image, i) => ({
      name: names[i] ?? (images.length === 1 ? '' : basename(image)),
      description: descriptions[i],
      device: devices[i]!,
      readOnly: ((o.readOnly ?? false) || o.loadSnapshot !== undefined) && !o.snapshot,
      multiConn: maxConnections > 1,
      reopen: opened[i]!.reopen,
    })),
    logger,
    maxConnections,
    persistent: o.persistent ?? false,
    tls,
    limits: { handshakeTimeoutMs },
    pollMaxUs: o.pollMaxUs === undefined ? defaultPollMaxUs() : parseCount(o.pollMaxUs, '--poll-max-us', 0, MAX_POLL_US),
    lanes: { entry: siblingModule('../serve-lane', import.meta.url), threads },
  });

  const listeners: Listener[] = await listenInherited(server);
  let uri: string;
  let socketPath: string | undefined;
  if (listeners.length > 0) {
    uri = listeners.map((l) => l.address).join(' ');
  } else if (o.port !== undefined || o.bind !== undefined) {
    const port = o.port !== undefined ? parseCount(o.port, '--port', 0, 65535) : NBD_DEFAULT_PORT;
    const l = await listenTcp(server, { host: o.bind ?? '127.0.0.1', port });
    listeners.push(l);
    const host = (o.bind ?? '127.0.0.1').includes(':') ? `[${o.bind}]` : (o.bind ?? '127.0.0.1');
    uri = `${tls ? 'nbds' : 'nbd'}://${host}:${l.port}/${encodeURIComponent(names[0] ?? '')}`;
  } else {
    socketPath = resolve(o.socket ?? defaultSocketPath());
    listeners.push(await listenUnix(server, socketPath));
    uri = `${tls ? 'nbds+unix' : 'nbd+unix'}:///${encodeURIComponent(names[0] ?? '')}?socket=${socketPath}`;
  }
  if (o.pidFile) writeFileSync(o.pidFile, `${process.pid}\n`);

  const done = new Promise<void>((resolveDone) => server.once('close', () => resolveDone()));
  const shutdown = (): void => {
    void server.close();
  };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);
  process.once('SIGHUP', shutdown);

  process.stdout.write(`${uri}\n`);
  if (process.env[FORK_ENV] === '1') {
    // The parent has what it needs; nothing more may go to its pipe.
    process.stdout.destroy();
  }
  await done;
  await Promise.allSettled(listeners.map((l) => l.close()));
  if (socketPath) rmSync(socketPath, { force: true });
  if (o.pidFile) rmSync(o.pidFile, { force: true });
  await Promise.allSettled(devices.map((d) => d.close()));
  return 0;
}
