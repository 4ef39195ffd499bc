// imgbd copy SRC DST: nbdcopy's job. Files or NBD URIs on either side; holes and zero
// ranges are not copied but zeroed (or skipped on a fresh destination); several
// connections when the export allows multi-conn; a progress bar on a terminal.

import { existsSync, statSync, closeSync, openSync, ftruncateSync } from 'node:fs';
import { progressBar } from '../lib/progress.js';
import { Backend } from '../../block/backend.js';
import type { BlockDevice } from '../../block/device.js';
import { openNbdDevice } from '../../client/index.js';
import { UsageError } from '../../errors.js';
import { openRaw } from '../../formats/raw/driver.js';
import { deviceTarget, transfer } from '../../image/transfer.js';
import { openSource } from '../lib/open-source.js';
import { isNbdUri, parseCount, parseSize } from '../parse.js';
import { isTerminal } from '../../sys/libc.js';

interface CopyOptions {
  format?: string;
  connections: string;
  requests: string;
  requestSize: string;
  progress?: boolean;
  flush?: boolean;
}

interface Side {
  /** One device per connection (several only for multi-conn NBD exports). */
  readonly devices: Backend[];
  close(): Promise<void>;
}

async function openSide(target: string, o: CopyOptions, writable: boolean, connections: number): Promise<Side> {
  let first: BlockDevice;
  const extra: BlockDevice[] = [];
  if (isNbdUri(target)) {
    first = await openNbdDevice(target);
    if (first.capabilities().multiConn) {
      for (let i = 1; i < connections; i++) extra.push(await openNbdDevice(target));
    }
  } else if (writable) {
    first = await openRaw(target, { readOnly: false });
  } else {
    first = (await openSource(target, { format: o.format, readOnly: true })).device;
  }
  const all = [first, ...extra];
  return {
    devices: all.map((d) => new Backend(d, { readOnly: !writable })),
    close: async () => {
      await Promise.allSettled(all.map((d) => d.close()));
    },
  };
}

/** A fresh regular file of the right size reads as zeros everywhere: zero ranges can be skipped. */
function prepareFileDestination(path: string, sizeBytes: number): boolean {
  if (!existsSync(path)) {
    const fd = openSync(path, 'wx', 0o644);
    ftruncateSync(fd, sizeBytes);
    closeSync(fd);
    return true;
  }
  const st = statSync(path);
  if (st.isFile()) {
    const fd = openSync(path, 'r+');
    ftruncateSync(fd, 0);
    ftruncateSync(fd, sizeBytes);
    closeSync(fd);
    return true;
  }
  return false;
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const o = opts as unknown as CopyOptions;
  const [srcName, dstName] = args as [string, string];
  const connections = parseCount(o.connections, '--connections', 1, 64);
  const perConnection = parseCount(o.requests, '--requests', 1, 1024);
  const requestBytes = parseSize(o.requestSize, '--request-size');
  if (requestBytes < 512 || requestBytes > 32 * 1024 * 1024) throw new UsageError('--request-size must be between 512 and 32M');

  const src = await openSide(srcName, o, false, connections);
  let dst: Side | undefined;
  try {
    const sizeBytes = src.devices[0]!.sizeBytes;
    let dstZeroed = false;
    if (!isNbdUri(dstName)) dstZeroed = prepareFileDestination(dstName, sizeBytes);
    dst = await openSide(dstName, o, true, connections);
    if (dst.devices[0]!.sizeBytes < sizeBytes) {
      throw new UsageError(`the destination is smaller (${dst.devices[0]!.sizeBytes} bytes) than the source (${sizeBytes} bytes)`);
    }
    const showProgress = o.progress ?? isTerminal(2);
    const bar = await progressBar('copying', showProgress, true);
    bar?.start(Math.ceil(sizeBytes / 2 ** 20), 0);
    await transfer({
      sources: src.devices,
      targets: dst.devices.map(deviceTarget),
      requestBytes,
      workers: Math.max(src.devices.length, dst.devices.length) * perConnection,
      grainBytes: Math.min(requestBytes, 4096),
      targetZeroed: dstZeroed,
      onProgress: (done) => bar?.update(Math.floor(done / 2 ** 20)),
    });
    if (dst.devices[0]!.capabilities().flush) await Promise.all(dst.devices.map((x) => x.flush()));
    bar?.update(Math.ceil(sizeBytes / 2 ** 20));
    bar?.stop();
  } finally {
    await dst?.close();
    await src.close();
  }
  return 0;
}
