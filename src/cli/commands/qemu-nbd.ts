// imgbd qemu-nbd: the -c / -d subset of qemu-nbd that LXC's nbd backend runs
// (src/lxc/storage/nbd.c: `qemu-nbd -c /dev/nbdN IMAGE`, kept in the foreground under a
// watcher, and `qemu-nbd -d /dev/nbdN` when the container stops). -c serves until the device
// is disconnected and then exits 0; a signal disconnects and exits 0 too, as qemu-nbd does.

import type { Command } from 'commander';
import { existsSync, lstatSync, mkdirSync, realpathSync, rmSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { UsageError } from '../../errors.js';
import { parseNbdName } from '../../kernel/device.js';
import { DeviceServer, disconnectAndWait } from '../../kernel/serve-on-device.js';
import type { Logger } from '../../server/logger.js';

const DISCONNECT_TIMEOUT_MS = 60_000;

function logger(verbose: boolean): Logger {
  const line = (level: string, m: string) => process.stderr.write(`qemu-nbd (imgbd) ${level}: ${m}\n`);
  return {
    info: (m) => verbose && line('info', m),
    warn: (m) => verbose && line('warn', m),
    error: (m) => line('error', m),
  };
}

/** "/dev/nbd3" → 3; a partition (nbd3p1) is refused, as qemu-nbd would fail on it. */
function deviceIndex(text: string, what: string): number {
  const n = parseNbdName(text);
  if (n === null || n.partition !== undefined) throw new UsageError(`${what} ${JSON.stringify(text)} is not an nbd device (/dev/nbdN)`);
  return n.index;
}

function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'bin', 'qemu-nbd'))) return dir;
    const up = dirname(dir);
    if (up === dir) throw new UsageError('cannot find bin/qemu-nbd above the imgbd installation');
    dir = up;
  }
}

/** DIR/qemu-nbd → bin/qemu-nbd; replaces an earlier symlink, never a real file. */
export function installShim(dir: string): string {
  const target = realpathSync(join(packageRoot(), 'bin', 'qemu-nbd'));
  mkdirSync(dir, { recursive: true });
  const link = resolve(dir, 'qemu-nbd');
  let existing: ReturnType<typeof lstatSync> | undefined;
  try {
    existing = lstatSync(link);
  } catch {
    existing = undefined;
  }
  if (existing && !existing.isSymbolicLink()) throw new UsageError(`${link} exists and is not a symlink: not replacing it`);
  if (existing) unlinkSync(link);
  symlinkSync(target, link);
  return link;
}

export async function run(args: string[], opts: Record<string, unknown>, _cmd: Command): Promise<number> {
  if (typeof opts.installShim === 'string') {
    process.stdout.write(`${installShim(opts.installShim)}\n`);
    return 0;
  }
  const log = logger(opts.verbose === true);
  if (opts.disconnect === true) {
    if (opts.connect !== undefined) throw new UsageError('-c and -d are exclusive');
    if (args.length !== 1) throw new UsageError('usage: qemu-nbd -d /dev/nbdN');
    const index = deviceIndex(args[0]!, 'device');
    await disconnectAndWait(index, DISCONNECT_TIMEOUT_MS, log);
    process.stdout.write(`/dev/nbd${index} disconnected\n`);
    return 0;
  }
  if (typeof opts.connect !== 'string') throw new UsageError('only qemu-nbd -c /dev/nbdN IMAGE and qemu-nbd -d /dev/nbdN are supported');
  if (args.length !== 1) throw new UsageError('usage: qemu-nbd -c /dev/nbdN [-f FMT] [-r] IMAGE');
  const index = deviceIndex(opts.connect, '-c');
  const iface = opts.interface ?? process.env.IMGBD_NBD_INTERFACE;
  if (iface !== undefined && iface !== 'auto' && iface !== 'netlink') throw new UsageError('qemu-nbd -c connects through netlink only');
  const server = await DeviceServer.start({
    image: args[0]!,
    index,
    readOnly: opts.readOnly === true,
    log,
    ...(typeof opts.format === 'string' && { format: opts.format }),
  });
  const pidFile = typeof opts.pidFile === 'string' ? opts.pidFile : undefined;
  if (pidFile) writeFileSync(pidFile, `${process.pid}\n`);
  const onSignal = (sig: NodeJS.Signals) => void server.stop(`signal ${sig}`);
  for (const s of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(s, onSignal);
  try {
    log.info(`stopped: ${await server.done}`);
  } finally {
    for (const s of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.off(s, onSignal);
    if (pidFile) rmSync(pidFile, { force: true });
  }
  return 0;
}
