// Starting the servers under test and running the clients against them.

import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, openSync, closeSync, rmSync, writeSync, statSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { join, resolve } from 'node:path';
import type { Row } from './rows.js';

export type ServerKind = 'imgbd' | 'qemu-nbd' | 'qemu-nbd-io_uring' | 'nbdkit';

export interface ServerHandle {
  readonly uri: string;
  stop(): Promise<void>;
}

export async function ensureRandomFile(path: string, sizeBytes: number): Promise<void> {
  if (existsSync(path) && statSync(path).size === sizeBytes) return;
  const fd = openSync(path, 'w');
  const chunk = Buffer.allocUnsafe(8 * 1024 * 1024);
  for (let off = 0; off < sizeBytes; off += chunk.length) {
    randomFillSync(chunk);
    writeSync(fd, chunk, 0, Math.min(chunk.length, sizeBytes - off), off);
  }
  closeSync(fd);
}

function commandFor(kind: ServerKind, image: string, socket: string, format: 'raw' | 'qcow2'): [string, string[]] {
  switch (kind) {
    case 'imgbd':
      return [resolve('bin/imgbd'), ['serve', '-f', format, '-k', socket, '-e', '0', '-t', image]];
    case 'qemu-nbd':
      return ['qemu-nbd', ['-f', format, '-k', socket, '-e', '0', '-t', image]];
    case 'qemu-nbd-io_uring':
      return ['qemu-nbd', ['-f', format, '--aio=io_uring', '-k', socket, '-e', '0', '-t', image]];
    case 'nbdkit':
      if (format !== 'raw') throw new Error('nbdkit serves raw images only in this benchmark');
      return ['nbdkit', ['-f', '-U', socket, 'file', image]];
  }
}

/** A qcow2 image: `from` converted (all clusters allocated), or empty of `sizeBytes`. */
export async function makeQcow2(path: string, from: string | null, sizeBytes: number): Promise<void> {
  const args = from === null ? ['create', '-q', '-f', 'qcow2', path, String(sizeBytes)] : ['convert', '-f', 'raw', '-O', 'qcow2', from, path];
  await runTimed('qemu-img', args);
}

/** Write back every dirty page of the machine: the next measurement starts from a clean page cache. */
export async function writeBack(): Promise<void> {
  await runTimed('sync', []);
}

export async function startServer(kind: ServerKind, image: string, dir: string, format: 'raw' | 'qcow2' = 'raw'): Promise<ServerHandle> {
  const socket = join(dir, `${kind}-${format}.sock`);
  // A server of an earlier round may have left its socket behind.
  rmSync(socket, { force: true });
  const [cmd, args] = commandFor(kind, image, socket, format);
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const deadline = Date.now() + 15_000;
  while (!existsSync(socket)) {
    if (child.exitCode !== null) throw new Error(`${kind} exited: ${stderr}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`${kind} did not create its socket: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return { uri: `nbd+unix:///?socket=${socket}`, stop: () => stop(child) };
}

function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(() => child.kill('SIGKILL'), 5000);
    child.on('exit', () => {
      clearTimeout(t);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

function runTimed(cmd: string, args: string[]): Promise<{ seconds: number; stdout: string }> {
  return new Promise((resolve, reject) => {
    const start = process.hrtime.bigint();
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      if (code !== 0) reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err}`));
      else resolve({ seconds, stdout: out });
    });
  });
}

export async function runClient(row: Row, uri: string, ctx: { source: string; sizeBytes: number; seconds: number; image: string }): Promise<number> {
  const gib = ctx.sizeBytes / 1024 ** 3;
  // A fresh image is fresh once: a second pass would overwrite allocated clusters (fresh rows
  // are repeated by the caller, each round on a new image). Otherwise the best of several: a
  // 1 GiB copy takes a fraction of a second, and the first passes through a code path of a
  // long-running server also pay for warming it (a JIT compiling it, buffers faulted in) that
  // later ones do not. Writes take five: imgbd's first six write passes after three reads, on
  // files made just before, took 388 347 334 316 312 326 ms (qemu-nbd --aio=io_uring's 337 332
  // 341 386 319 332, nbdkit's 289 303 305 286 331 291); three reads are enough for reads.
  const passes = row.fresh ? 1 : row.client === 'nbdcopy-write' ? 5 : 3;
  switch (row.client) {
    case 'nbdcopy-read': {
      const best = Math.min(...(await repeat(passes, () => runTimed('nbdcopy', [uri, 'null:']))).map((r) => r.seconds));
      return gib / best;
    }
    case 'nbdcopy-write': {
      // Dirty pages left by an earlier pass (or by whichever server ran before) are written back
      // first, so every server writes into the same clean page cache, not into writeback.
      const best = Math.min(
        ...(await repeat(passes, async () => {
          await writeBack();
          return runTimed('nbdcopy', [ctx.source, uri]);
        })).map((r) => r.seconds),
      );
      return gib / best;
    }
    case 'fio': {
      if (row.rw === 'randwrite') {
        // The image leaves the page cache first (written back, then dropped). Written in large
        // chunks it sits in large folios (up to 2 MiB), and a 4K write dirties a whole one:
        // the dirty limit is reached within a second and every server is held to the disk's
        // pace (21k IOPS for each of them here, 160-190k from 4K pages).
        await writeBack();
        await runTimed('dd', [`if=${ctx.image}`, 'iflag=nocache', 'count=0']);
      }
      const { stdout } = await runTimed('fio', [
        '--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${row.rw}`, '--bs=4k', `--iodepth=${row.iodepth}`,
        '--time_based', `--runtime=${ctx.seconds}`, '--ramp_time=1', `--size=${ctx.sizeBytes}`, '--output-format=json',
      ]);
      const job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
      // The pages a write row dirtied are written back now, not during the next measurement.
      if (row.rw === 'randwrite') await writeBack();
      return row.rw === 'randwrite' ? job.write.iops : job.read.iops;
    }
  }
}

async function repeat<T>(n: number, f: () => Promise<T>): Promise<T[]> {
  const out: T[] = [];
  for (let i = 0; i < n; i++) out.push(await f());
  return out;
}
