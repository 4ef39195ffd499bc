// Starting an in-process NbdServer on a unix socket in a temporary directory, with cleanup
// registered before anything can fail; and a raw-socket NBD client whose messages are built by
// hand (not with the codec under test), with ways to misbehave (pause reading, hang up).

import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import type { BlockDevice } from '../../src/block/device.js';
import { openRaw } from '../../src/formats/raw/driver.js';
import { listenUnix } from '../../src/server/listen.js';
import type { Logger } from '../../src/server/logger.js';
import { NbdServer, type NbdServerOptions } from '../../src/server/server.js';
import { tempDir } from './peers.js';

export interface RecordingLogger extends Logger {
  readonly lines: string[];
}

export function recordingLogger(): RecordingLogger {
  const lines: string[] = [];
  return {
    lines,
    info: (m) => lines.push(`info: ${m}`),
    warn: (m) => lines.push(`warn: ${m}`),
    error: (m) => lines.push(`error: ${m}`),
  };
}

export interface TestServer {
  readonly server: NbdServer;
  readonly socketPath: string;
  /** nbd+unix URI of the default export. */
  readonly uri: string;
  readonly log: RecordingLogger;
  readonly dir: string;
}

/** Start `opts` on `dir`/nbd.sock (dir: a fresh temp dir unless given); closed when the test ends. */
export async function startServer(t: TestContext, opts: Omit<NbdServerOptions, 'logger'>, dir = tempDir(t)): Promise<TestServer> {
  const log = recordingLogger();
  const server = new NbdServer({ ...opts, logger: log });
  t.after(() => server.close());
  const socketPath = join(dir, 'nbd.sock');
  await listenUnix(server, socketPath);
  return { server, socketPath, uri: `nbd+unix:///?socket=${socketPath}`, log, dir };
}

/** nbd+unix URI for a named export. */
export function exportUri(socketPath: string, name: string, scheme = 'nbd+unix'): string {
  return `${scheme}:///${encodeURIComponent(name)}?socket=${socketPath}`;
}

/** Open a raw image file as a device closed when the test ends. */
export async function openRawDevice(t: TestContext, path: string, readOnly = false): Promise<BlockDevice> {
  const dev = await openRaw(path, { readOnly });
  t.after(() => dev.close());
  return dev;
}

// ---- a raw-socket client ----

const IHAVEOPT = Buffer.from('IHAVEOPT');
const REQUEST_MAGIC = 0x25609513;
export const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8, LIST_META: 9, SET_META: 10, EXTENDED_HEADERS: 11 };
export const REP = { ACK: 1, SERVER: 2, INFO: 3, META: 4, ERR_UNSUP: 0x80000001, ERR_POLICY: 0x80000002, ERR_INVALID: 0x80000003, ERR_UNKNOWN: 0x80000006, ERR_TOO_BIG: 0x80000009 };

export function infoRequest(name: string, infos: number[], nameLenOverride?: number): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(nameLenOverride ?? n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((x, i) => b.writeUInt16BE(x, 6 + n.length + 2 * i));
  return b;
}

export function metaRequest(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const u32 = (v: number): Buffer => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v);
    return b;
  };
  const n = Buffer.from(name);
  parts.push(u32(n.length), n, u32(queries.length));
  for (const q of queries) parts.push(u32(Buffer.byteLength(q)), Buffer.from(q));
  return Buffer.concat(parts);
}

export class RawNbdClient {
  private readonly sock: Socket;
  private buf = Buffer.alloc(0);
  private ended = false;
  private wake: (() => void) | undefined;

  private constructor(sock: Socket) {
    this.sock = sock;
    sock.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake?.();
    });
    const end = (): void => {
      this.ended = true;
      this.wake?.();
    };
    sock.on('end', end);
    sock.on('close', end);
    sock.on('error', end);
  }

  static open(path: string): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => resolve(new RawNbdClient(s)));
      s.once('error', reject);
    });
  }

  get isClosed(): boolean {
    return this.ended;
  }

  write(b: Buffer): void {
    if (!this.sock.destroyed) this.sock.write(b);
  }

  pause(): void {
    this.sock.pause();
  }

  resume(): void {
    this.sock.resume();
  }

  destroy(): void {
    this.sock.destroy();
  }

  private async waitUntil(ok: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!ok()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = undefined;
    }
  }

  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    await this.waitUntil(() => this.buf.length >= n || this.ended, timeoutMs, `${n} bytes`);
    if (this.buf.length < n) throw new Error(`connection closed with ${this.buf.length} of ${n} bytes`);
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Resolves when the server has closed the connection (whatever was still unread is dropped). */
  async expectClosed(timeoutMs = 5000): Promise<void> {
    await this.waitUntil(() => this.ended, timeoutMs, 'the server to close the connection');
  }

  // ---- handshake ----

  async greet(clientFlags = 3): Promise<void> {
    const g = await this.read(18);
    assert.equal(g.subarray(0, 8).toString(), 'NBDMAGIC');
    assert.ok(g.subarray(8, 16).equals(IHAVEOPT));
    assert.equal(g.readUInt16BE(16), 3); // FIXED_NEWSTYLE | NO_ZEROES
    const f = Buffer.alloc(4);
    f.writeUInt32BE(clientFlags);
    this.write(f);
  }

  option(opt: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
    const h = Buffer.alloc(16);
    IHAVEOPT.copy(h);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(declaredLength, 12);
    this.write(Buffer.concat([h, data]));
  }

  async optReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    assert.equal(h.readBigUInt64BE(0), 0x3e889045565a9n);
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }

  /** Read option replies up to the final ACK or error; returns all of them. */
  async optReplies(): Promise<{ option: number; type: number; data: Buffer }[]> {
    const out = [];
    for (;;) {
      const r = await this.optReply();
      out.push(r);
      if (r.type === REP.ACK || r.type >= 0x80000000) return out;
    }
  }

  async expectOptError(opt: number, type: number): Promise<void> {
    const replies = await this.optReplies();
    const last = replies[replies.length - 1]!;
    assert.equal(last.option, opt);
    assert.equal(last.type >>> 0, type, `reply 0x${last.type.toString(16)}: ${last.data.toString()}`);
  }

  /** Optionally negotiate structured replies and base:allocation, then NBD_OPT_GO. */
  async go(name: string, opts: { structured?: boolean; meta?: boolean } = {}): Promise<void> {
    await this.greet();
    if (opts.structured ?? true) {
      this.option(OPT.STRUCTURED_REPLY);
      assert.equal((await this.optReply()).type, REP.ACK);
    }
    if (opts.meta) {
      this.option(OPT.SET_META, metaRequest(name, ['base:allocation']));
      assert.deepEqual((await this.optReplies()).map((r) => r.type), [REP.META, REP.ACK]);
    }
    this.option(OPT.GO, infoRequest(name, [3]));
    const replies = await this.optReplies();
    assert.equal(replies[replies.length - 1]!.type, REP.ACK, replies.map((r) => r.data.toString()).join());
  }

  // ---- transmission ----

  request(type: number, flags: number, cookie: bigint, offset: bigint, length: number, payload?: Buffer): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(offset, 16);
    h.writeUInt32BE(length, 24);
    this.write(payload ? Buffer.concat([h, payload]) : h);
  }

  async simpleReply(): Promise<{ error: number; cookie: bigint }> {
    const h = await this.read(16);
    assert.equal(h.readUInt32BE(0), 0x67446698);
    return { error: h.readUInt32BE(4), cookie: h.readBigUInt64BE(8) };
  }

  async chunk(): Promise<{ flags: number; type: number; cookie: bigint; payload: Buffer }> {
    const h = await this.read(20);
    assert.equal(h.readUInt32BE(0), 0x668e33ef);
    return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), payload: await this.read(h.readUInt32BE(16)) };
  }

  /** A structured error chunk: returns the errno. */
  async errorChunk(cookie: bigint): Promise<number> {
    const c = await this.chunk();
    assert.equal(c.cookie, cookie);
    assert.equal(c.type, 0x8001, `chunk type ${c.type}`);
    assert.equal(c.flags & 1, 1);
    return c.payload.readUInt32BE(0);
  }
}
