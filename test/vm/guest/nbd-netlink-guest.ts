// Runs inside the test VM (as root, nbd loaded): attaches /dev/nbdN through NbdNetlink to an
// in-memory transmission-phase responder on a socketpair, drives it with dd, and reports each
// check as a JSON line in $IMGBD_VM_RESULTS for netlink.test.ts / smoke.test.ts to assert.
//
// The responder is deliberately minimal (nbd-proto.md, "Transmission"): 28-byte requests
// (magic 0x25609513, u16 flags, u16 type, u64 cookie, u64 offset, u32 length, big-endian)
// answered with 16-byte simple replies (magic 0x67446698, u32 error, u64 cookie).

import { spawn } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { Socket } from 'node:net';
import { NBD_CFLAG, NbdNetlink } from '../../../src/kernel/nbd-netlink.js';
import { closeFd, socketPair } from '../../../src/sys/socket.js';
import { errorDetail, reportCheck, runCheck } from './report.js';

const REQUEST_MAGIC = 0x25609513;
const REPLY_MAGIC = 0x67446698;
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4 } as const;
const NBD_FLAG_HAS_FLAGS = 1 << 0;
const NBD_FLAG_SEND_FLUSH = 1 << 2;
const NBD_FLAG_SEND_TRIM = 1 << 5;
const SIZE_BYTES = 4 * 1024 * 1024;
const EINVAL = 22;

const scratch = process.env.IMGBD_VM_SCRATCH ?? '/tmp';

function report(check: string, ok: boolean, detail?: unknown): void {
  reportCheck('netlink', check, ok, detail);
}

function expectCheck<T>(check: string, fn: () => Promise<T> | T): Promise<T | undefined> {
  return runCheck('netlink', check, fn);
}

function fail(message: string): never {
  throw new Error(message);
}

/** Serves one kernel-side socket from `disk`; counts requests by type. */
class Responder {
  readonly counts = new Map<number, number>();
  readonly closed: Promise<void>;
  private pending = Buffer.alloc(0);
  private readonly sock: Socket;

  constructor(fd: number, private readonly disk: Buffer) {
    this.sock = new Socket({ fd, readable: true, writable: true });
    this.sock.on('data', (d: Buffer) => this.onData(d));
    this.closed = new Promise((resolve) => this.sock.on('close', () => resolve()));
    this.sock.on('error', () => undefined);
  }

  private onData(d: Buffer): void {
    this.pending = Buffer.concat([this.pending, d]);
    for (;;) {
      if (this.pending.length < 28) return;
      const magic = this.pending.readUInt32BE(0);
      if (magic !== REQUEST_MAGIC) {
        report('responder-request-magic', false, { magic: magic.toString(16) });
        this.sock.destroy();
        return;
      }
      const type = this.pending.readUInt16BE(6);
      const cookie = this.pending.subarray(8, 16);
      const offset = Number(this.pending.readBigUInt64BE(16));
      const length = this.pending.readUInt32BE(24);
      const payloadBytes = type === CMD.WRITE ? length : 0;
      if (this.pending.length < 28 + payloadBytes) return;
      this.counts.set(type, (this.counts.get(type) ?? 0) + 1);
      const reply = Buffer.alloc(16);
      reply.writeUInt32BE(REPLY_MAGIC, 0);
      cookie.copy(reply, 8);
      const inRange = offset + length <= this.disk.length;
      if (!inRange && (type === CMD.READ || type === CMD.WRITE || type === CMD.TRIM)) reply.writeUInt32BE(EINVAL, 4);
      if (type === CMD.DISC) {
        this.pending = Buffer.alloc(0);
        this.sock.end();
        return;
      }
      if (type === CMD.WRITE && inRange) this.pending.copy(this.disk, offset, 28, 28 + length);
      if (type === CMD.TRIM && inRange) this.disk.fill(0, offset, offset + length);
      this.sock.write(reply);
      if (type === CMD.READ) this.sock.write(inRange ? this.disk.subarray(offset, offset + length) : Buffer.alloc(length));
      this.pending = this.pending.subarray(28 + payloadBytes);
    }
  }

  destroy(): void {
    this.sock.destroy();
  }
}

function runDd(args: string[]): Promise<void> {
  // Asynchronous on purpose: this process must keep serving the kernel while dd runs.
  return new Promise((resolve, reject) => {
    const child = spawn('dd', [...args, 'status=none'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`dd ${args.join(' ')} exited ${code}: ${err}`))));
  });
}

async function waitUntil(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function pattern(bytes: number, seed: number): Buffer {
  const b = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i += 4) b.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ seed) >>> 0, i);
  return b;
}

async function main(): Promise<void> {
  const nl = await NbdNetlink.open();
  try {
    report('resolve-family', true, { id: nl.family.id, version: nl.family.version, groups: [...nl.family.mcastGroups.keys()] });
    const before = await nl.status();
    report('status-lists-devices', before.length >= 1 && before.every((d) => !d.connected), before.length);

    // 1. CONNECT without an index: the kernel picks a free device and tells us which.
    const disk = Buffer.alloc(SIZE_BYTES);
    const [userFd, kernelFd] = socketPair();
    const responder = new Responder(userFd, disk);
    const index = (await expectCheck('connect-picks-index', () =>
      nl.connect({
        socketFds: [kernelFd],
        sizeBytes: SIZE_BYTES,
        blockSizeBytes: 4096,
        serverFlags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_TRIM,
        timeoutSeconds: 30,
        deadConnTimeoutSeconds: 5,
        backendIdentifier: 'imgbd-vm-test',
      }),
    )) as number | undefined;
    closeFd(kernelFd);
    if (index === undefined) return;
    const dev = `/dev/nbd${index}`;
    const sys = `/sys/block/nbd${index}`;

    await expectCheck('sysfs-size-and-identity', async () => {
      // The size is set before the pid file appears but is published asynchronously.
      await waitUntil('sysfs size', () => readFileSync(`${sys}/size`, 'utf8').trim() === String(SIZE_BYTES / 512));
      const pid = Number(readFileSync(`${sys}/pid`, 'utf8').trim());
      const backend = existsSync(`${sys}/backend`) ? readFileSync(`${sys}/backend`, 'utf8').trim() : null;
      if (backend !== null && backend !== 'imgbd-vm-test') fail(`backend is ${backend}`);
      const lbs = Number(readFileSync(`${sys}/queue/logical_block_size`, 'utf8').trim());
      if (lbs !== 4096) fail(`logical block size ${lbs}`);
      return { pid, ourPid: process.pid, backend, logicalBlockSize: lbs };
    });

    await expectCheck('status-connected', async () => {
      const st = await nl.status(index);
      if (st.length !== 1 || st[0]!.index !== index || !st[0]!.connected) fail(`status ${JSON.stringify(st)}`);
      const all = await nl.status();
      if (!all.some((d) => d.index === index && d.connected)) fail('device missing from the full list');
      return st;
    });

    await expectCheck('connect-busy-index-refused', async () => {
      const [a, b] = socketPair();
      try {
        await nl.connect({ index, socketFds: [b], sizeBytes: SIZE_BYTES, blockSizeBytes: 4096, serverFlags: NBD_FLAG_HAS_FLAGS });
        fail('second CONNECT on a busy index succeeded');
      } catch (err) {
        const e = err as { name?: string; code?: string; errno?: number };
        if (e.name !== 'NetlinkError' || e.code !== 'EBUSY') throw err;
        return { code: e.code, errno: e.errno };
      } finally {
        closeFd(a);
        closeFd(b);
      }
    });

    const file = `${scratch}/nbd-netlink-pattern.bin`;
    const written = pattern(256 * 1024, 0x5eed);
    writeFileSync(file, written);

    await expectCheck('dd-write-reaches-server', async () => {
      await runDd([`if=${file}`, `of=${dev}`, 'bs=64k', 'seek=4', 'oflag=direct', 'conv=fsync']);
      const at = 4 * 64 * 1024;
      if (!disk.subarray(at, at + written.length).equals(written)) fail('server memory does not hold what dd wrote');
      const flushes = responder.counts.get(CMD.FLUSH) ?? 0;
      if (flushes === 0) fail('conv=fsync sent no NBD_CMD_FLUSH');
      return { writes: responder.counts.get(CMD.WRITE), flushes };
    });

    await expectCheck('dd-read-from-server', async () => {
      const fresh = pattern(128 * 1024, 0xabcdef);
      fresh.copy(disk, 1024 * 1024);
      const out = `${scratch}/nbd-netlink-read.bin`;
      await runDd([`if=${dev}`, `of=${out}`, 'bs=64k', 'skip=16', 'count=2', 'iflag=direct']);
      if (!readFileSync(out).equals(fresh)) fail('dd read back something other than the server memory');
      return { reads: responder.counts.get(CMD.READ) };
    });

    await expectCheck('reconfigure-needs-backend', async () => {
      try {
        await nl.reconfigure({ index, timeoutSeconds: 60 });
        fail('RECONFIGURE without the backend identifier succeeded');
      } catch (err) {
        const e = err as { name?: string; code?: string };
        if (e.name !== 'NetlinkError' || e.code !== 'EINVAL') throw err;
        return { code: e.code };
      }
    });

    await expectCheck('reconfigure-timeout', async () => {
      await nl.reconfigure({ index, timeoutSeconds: 60, backendIdentifier: 'imgbd-vm-test' });
      const t = existsSync(`${sys}/queue/io_timeout`) ? readFileSync(`${sys}/queue/io_timeout`, 'utf8').trim() : null;
      if (t !== null && t !== '60000') fail(`io_timeout is ${t}`);
      return { ioTimeoutMs: t };
    });

    await expectCheck('disconnect', async () => {
      await nl.disconnect(index);
      await responder.closed;
      if ((responder.counts.get(CMD.DISC) ?? 0) !== 1) fail('server did not receive NBD_CMD_DISC');
      await waitUntil('status disconnected', async () => !(await nl.status(index))[0]?.connected);
      return { disc: responder.counts.get(CMD.DISC) };
    });

    await expectCheck('reconfigure-unconnected-refused', async () => {
      try {
        await nl.reconfigure({ index, timeoutSeconds: 10, backendIdentifier: 'imgbd-vm-test' });
        fail('RECONFIGURE of a disconnected device succeeded');
      } catch (err) {
        const e = err as { name?: string; code?: string; errno?: number };
        if (e.name !== 'NetlinkError' || typeof e.errno !== 'number' || e.errno <= 0) throw err;
        return { code: e.code };
      }
    });

    // 2. DISCONNECT_ON_CLOSE: the device goes away when its last opener closes it.
    await expectCheck('disconnect-on-close', async () => {
      const disk2 = Buffer.alloc(SIZE_BYTES);
      const [u, k] = socketPair();
      const r2 = new Responder(u, disk2);
      let i2: number;
      try {
        i2 = await nl.connect({
          socketFds: [k],
          sizeBytes: SIZE_BYTES,
          blockSizeBytes: 512,
          serverFlags: NBD_FLAG_HAS_FLAGS,
          clientFlags: NBD_CFLAG.DISCONNECT_ON_CLOSE,
        });
      } finally {
        closeFd(k);
      }
      if (!(await nl.status(i2))[0]?.connected) fail('not connected after CONNECT');
      const out = `${scratch}/nbd-netlink-doc.bin`;
      await runDd([`if=/dev/nbd${i2}`, `of=${out}`, 'bs=4k', 'count=1', 'iflag=direct']);
      await waitUntil('disconnect after last close', async () => !(await nl.status(i2))[0]?.connected);
      await r2.closed;
      return { index: i2, disc: r2.counts.get(CMD.DISC) ?? 0 };
    });
  } finally {
    nl.close();
  }
}

main().catch((err) => {
  report('guest-script', false, errorDetail(err));
  process.exitCode = 1;
});
