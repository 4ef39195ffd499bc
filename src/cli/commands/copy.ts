// imgbd copy SRC DST: nbdcopy's job. Files or NBD URIs on either side; holes and zero
// ranges are not copied but zeroed (or skipped on a fresh destination); several
// connections when the export allows multi-conn; a progress bar on a terminal.

import { existsSync, statSync, closeSync, openSync, ftruncateSync } from 'node:fs';
import { SingleBar } from 'cli-progress';
import { Backend } from '../../block/backend.js';
import { EXTENT_ZERO, type BlockDevice } from '../../block/device.js';
import { walkExtents } from '../../block/walk.js';
import { openNbdDevice } from '../../client/index.js';
import { UsageError } from '../../errors.js';
import { openRaw } from '../../formats/raw/driver.js';
import { openSource } from '../lib/open-source.js';
import { isNbdUri, parseCount, parseSize } from '../parse.js';

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

interface Job {
  readonly offset: number;
  readonly length: number;
  readonly zero: boolean;
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

async function* jobs(src: BlockDevice, requestBytes: number): AsyncGenerator<Job> {
  for await (const e of walkExtents(src)) {
    const zero = (e.flags & EXTENT_ZERO) !== 0;
    // Zero ranges go as one request each (split only to keep NBD lengths within 32 bits).
    const step = zero ? 2 ** 30 : requestBytes;
    for (let off = e.offset; off < e.offset + e.length; off += step) {
      yield { offset: off, length: Math.min(step, e.offset + e.length - off), zero };
    }
  }
}

function isAllZero(buf: Buffer): boolean {
  // Compare 8 bytes at a time; a data block that turns out to be zeros is not written.
  const words = buf.length >>> 3;
  const view = new BigUint64Array(buf.buffer, buf.byteOffset, buf.byteOffset % 8 === 0 ? words : 0);
  if (view.length === words) {
    for (let i = 0; i < words; i++) if (view[i] !== 0n) return false;
    for (let i = words << 3; i < buf.length; i++) if (buf[i] !== 0) return false;
    return true;
  }
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
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
    const showProgress = o.progress ?? process.stderr.isTTY === true;
    const bar = showProgress ? new SingleBar({ format: 'copying [{bar}] {percentage}% | {value}/{total} MiB | ETA {eta}s', stream: process.stderr }) : undefined;
    bar?.start(Math.ceil(sizeBytes / 2 ** 20), 0);
    let doneBytes = 0;

    const queue = jobs(src.devices[0]!, requestBytes);
    // Generators cannot be advanced concurrently: workers take jobs through one chain.
    let chain: Promise<IteratorResult<Job>> = Promise.resolve({ done: false, value: undefined as unknown as Job });
    const take = async (): Promise<Job | undefined> => {
      chain = chain.then(() => queue.next());
      const r = await chain;
      return r.done ? undefined : r.value;
    };

    const workers: Promise<void>[] = [];
    const workerCount = Math.max(src.devices.length, dst.devices.length) * perConnection;
    for (let w = 0; w < workerCount; w++) {
      const s = src.devices[w % src.devices.length]!;
      const d = dst.devices[w % dst.devices.length]!;
      const buf = Buffer.allocUnsafe(requestBytes);
      workers.push(
        (async () => {
          for (let job = await take(); job; job = await take()) {
            if (job.zero) {
              if (!dstZeroed) await d.zero(job.offset, job.length, { mayTrim: true });
            } else {
              const view = buf.subarray(0, job.length);
              await s.pread(view, job.offset);
              if (isAllZero(view)) {
                if (!dstZeroed) await d.zero(job.offset, job.length, { mayTrim: true });
              } else {
                await d.pwrite(view, job.offset);
              }
            }
            doneBytes += job.length;
            bar?.update(Math.floor(doneBytes / 2 ** 20));
          }
        })(),
      );
    }
    await Promise.all(workers);
    if (dst.devices[0]!.capabilities().flush) await Promise.all(dst.devices.map((x) => x.flush()));
    bar?.update(Math.ceil(sizeBytes / 2 ** 20));
    bar?.stop();
  } finally {
    await dst?.close();
    await src.close();
  }
  return 0;
}
