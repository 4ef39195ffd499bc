// The NBD client: handshake through handshake.ts, then the transmission phase
// (nbd-proto.md "Transmission", "Request types", "Structured reply types"). Requests carry
// distinct cookies and may complete in any order; an in-flight table matches replies to
// requests, bounded by a queue. Anything the server does that the protocol forbids fails
// every pending request with a ProtocolError and drops the connection.

import type { BlockSizes } from '../block/device.js';
import { DEFAULT_BLOCK_SIZES } from '../block/device.js';
import { ImgbdError, ProtocolError, RequestError } from '../errors.js';
import {
  BASE_ALLOCATION,
  NBD_CMD,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_ROTATIONAL,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_REPLY_TYPE,
  REQUEST_SIZE,
} from '../protocol/constants.js';
import { wireToErrno } from '../protocol/errno.js';
import type { ReplyEvent, StructuredChunk } from '../protocol/reply-parser.js';
import { encodeRequest, type BlockDescriptor } from '../protocol/transmission.js';
import type { NbdErrno } from '../errors.js';
import { closeSocket, listExports, listMetaContexts, negotiate, queryExport, type ExportInfo, type ExportListEntry, type Session } from './handshake.js';
import { ReadCoverage } from './read-coverage.js';
import { resolveTarget, type NbdConnectOptions, type NbdTargetInput, type NbdTlsOptions } from './target.js';
import type { WireHandler } from './wire.js';

export type { ExportInfo, ExportListEntry } from './handshake.js';
export type { NbdConnectOptions, NbdTargetInput, NbdTlsOptions, NbdAddress } from './target.js';

/** What the protocol lets a client send without negotiated sizes ("limit ... to 2^25"). */
const DEFAULT_MAX_REQUEST = 32 * 1024 * 1024;
/** Commands without payload (trim, zero, cache, block status) are split at this effect length. */
const MAX_EFFECT_LENGTH = 1024 * 1024 * 1024;
const DEFAULT_MAX_IN_FLIGHT = 64;

export interface ReadOptions {
  /** NBD_CMD_FLAG_DF: ask for a single content chunk (ignored when the server lacks it). */
  readonly df?: boolean;
}
export interface WriteFlags {
  readonly fua?: boolean;
}
export interface ZeroFlags extends WriteFlags {
  /** NBD_CMD_FLAG_NO_HOLE: the zeroed range must stay allocated. */
  readonly noHole?: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than zero slowly. */
  readonly fast?: boolean;
}
export interface BlockStatusOptions {
  readonly reqOne?: boolean;
}

/** Descriptors per negotiated context name. Lengths are as the server sent them. */
export type BlockStatusReply = Map<string, BlockDescriptor[]>;

interface Pending {
  readonly cookie: bigint;
  readonly cmd: number;
  readonly flags: number;
  readonly offset: number;
  readonly length: number;
  /** Reads: the caller's buffer slice for [offset, offset+length). */
  readonly buf?: Buffer;
  readonly coverage?: ReadCoverage;
  contentChunks: number;
  readonly status?: Map<number, BlockDescriptor[]>;
  error?: { errno: NbdErrno; message: string };
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
}

/** Copy read data to its place in the caller's buffer, unless the parser already put it there. */
function placeData(data: Buffer, buf: Buffer, at: number): void {
  if (data.buffer === buf.buffer && data.byteOffset === buf.byteOffset + at) return;
  data.copy(buf, at);
}

function violation(message: string): ProtocolError {
  return new ProtocolError('ERR_NBD_PROTOCOL', message);
}

const CMD_NAMES = new Map<number, string>(Object.entries(NBD_CMD).map(([k, v]) => [v, `NBD_CMD_${k}`]));

export class NbdClient implements WireHandler {
  readonly exportName: string;
  readonly info: ExportInfo;
  readonly sizeBytes: number;
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  readonly tls: boolean;
  /** Negotiated metadata contexts, name -> id. */
  readonly metaContexts: ReadonlyMap<string, number>;
  /** The sizes this client obeys: the server's, or the protocol defaults. */
  readonly blockSizes: BlockSizes;

  private readonly session: Session;
  private readonly contextNames: ReadonlyMap<number, string>;
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private readonly maxInFlight: number;
  private inFlight = 0;
  private readonly waiting: { resolve: () => void; reject: (err: Error) => void }[] = [];
  private readonly idleWaiters: (() => void)[] = [];
  private readonly maxRequest: number;
  private failure: Error | null = null;
  /** Set while the socket's write buffer is over its high-water mark. */
  private drained: Promise<void> | null = null;
  private closing = false;
  private shutdownRequested = false;

  private constructor(session: Session, negotiated: Awaited<ReturnType<typeof negotiate>>, opts: NbdConnectOptions) {
    this.session = session;
    this.info = negotiated.info;
    this.exportName = negotiated.info.name;
    this.sizeBytes = negotiated.info.sizeBytes;
    this.transmissionFlags = negotiated.info.transmissionFlags;
    this.structuredReplies = negotiated.structuredReplies;
    this.tls = session.tls;
    this.contextNames = negotiated.metaContexts;
    this.metaContexts = new Map([...negotiated.metaContexts].map(([id, name]) => [name, id]));
    const server = negotiated.info.blockSizes;
    this.blockSizes = server ?? { ...DEFAULT_BLOCK_SIZES, maximum: DEFAULT_MAX_REQUEST };
    const cap = Math.min(this.blockSizes.maximum, opts.maxRequestBytes ?? DEFAULT_MAX_REQUEST);
    this.maxRequest = Math.max(this.blockSizes.minimum, cap - (cap % this.blockSizes.minimum));
    this.maxInFlight = Math.max(1, opts.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT);
    session.rawSocket.setTimeout(0);
    session.wire.setHandler(this);
  }

  /** Connect, negotiate and enter transmission. */
  static async connect(target: NbdTargetInput, opts: NbdConnectOptions = {}): Promise<NbdClient> {
    const resolved = resolveTarget(target, opts);
    const negotiated = await negotiate(resolved, {
      structuredReplies: opts.structuredReplies ?? true,
      metaContexts: opts.metaContexts ?? [BASE_ALLOCATION],
      requestInfo: opts.requestInfo ?? true,
    });
    return new NbdClient(negotiated.session, negotiated, opts);
  }

  /** NBD_OPT_LIST: names and descriptions of the exports. */
  static list(target: NbdTargetInput, opts: { tls?: NbdTlsOptions; handshakeTimeoutMs?: number } = {}): Promise<ExportListEntry[]> {
    return listExports(resolveTarget(target, opts));
  }

  /** NBD_OPT_INFO for one export (default: the URI's), without entering transmission. */
  static info(target: NbdTargetInput, exportName?: string, opts: { tls?: NbdTlsOptions; handshakeTimeoutMs?: number } = {}): Promise<ExportInfo> {
    const resolved = resolveTarget(target, { ...opts, ...(exportName !== undefined ? { exportName } : {}) });
    return queryExport(resolved, resolved.exportName);
  }

  /** NBD_OPT_LIST_META_CONTEXT: context names available on an export (all, or matching `queries`). */
  static listMetaContexts(target: NbdTargetInput, opts: { exportName?: string; queries?: readonly string[]; tls?: NbdTlsOptions; handshakeTimeoutMs?: number } = {}): Promise<string[]> {
    const resolved = resolveTarget(target, opts);
    return listMetaContexts(resolved, resolved.exportName, opts.queries ?? []);
  }

  private flag(bit: number): boolean {
    return (this.transmissionFlags & bit) !== 0;
  }
  get canWrite(): boolean {
    return !this.flag(NBD_FLAG_READ_ONLY);
  }
  get canFlush(): boolean {
    return this.flag(NBD_FLAG_SEND_FLUSH);
  }
  get canFua(): boolean {
    return this.flag(NBD_FLAG_SEND_FUA);
  }
  get canTrim(): boolean {
    return this.flag(NBD_FLAG_SEND_TRIM);
  }
  get canZero(): boolean {
    return this.flag(NBD_FLAG_SEND_WRITE_ZEROES);
  }
  get canFastZero(): boolean {
    return this.flag(NBD_FLAG_SEND_FAST_ZERO);
  }
  get canDf(): boolean {
    return this.flag(NBD_FLAG_SEND_DF) && this.structuredReplies;
  }
  get canMultiConn(): boolean {
    return this.flag(NBD_FLAG_CAN_MULTI_CONN);
  }
  get canCache(): boolean {
    return this.flag(NBD_FLAG_SEND_CACHE);
  }
  get isRotational(): boolean {
    return this.flag(NBD_FLAG_ROTATIONAL);
  }
  get description(): string | undefined {
    return this.info.description;
  }
  /** Requests waiting for replies right now. */
  get inFlightCount(): number {
    return this.pending.size;
  }
  /** The error that ended the connection, if one did. */
  get failed(): Error | null {
    return this.failure;
  }

  // ---- commands ----

  async pread(buf: Buffer, offset: number, opts: ReadOptions = {}): Promise<void> {
    this.checkRange(offset, buf.length, 'EINVAL');
    const flags = opts.df === true && this.canDf ? NBD_CMD_FLAG_DF : 0;
    await this.split(offset, buf.length, this.maxRequest, (off, len) => this.submit(NBD_CMD.READ, flags, off, len, { readInto: buf.subarray(off - offset, off - offset + len) }));
  }

  async pwrite(buf: Buffer, offset: number, opts: WriteFlags = {}): Promise<void> {
    this.requireWritable();
    this.checkRange(offset, buf.length, 'ENOSPC');
    await this.withFua(opts.fua, (fua) =>
      this.split(offset, buf.length, this.maxRequest, (off, len) => this.submit(NBD_CMD.WRITE, fua, off, len, { payload: buf.subarray(off - offset, off - offset + len) })),
    );
  }

  async flush(): Promise<void> {
    if (!this.canFlush) throw new RequestError('ENOTSUP', 'the server does not support NBD_CMD_FLUSH');
    await this.submit(NBD_CMD.FLUSH, 0, 0, 0);
  }

  async trim(offset: number, length: number, opts: WriteFlags = {}): Promise<void> {
    this.requireWritable();
    if (!this.canTrim) throw new RequestError('ENOTSUP', 'the server does not support NBD_CMD_TRIM');
    this.checkRange(offset, length, 'EINVAL');
    await this.withFua(opts.fua, (fua) => this.split(offset, length, MAX_EFFECT_LENGTH, (off, len) => this.submit(NBD_CMD.TRIM, fua, off, len)));
  }

  async zero(offset: number, length: number, opts: ZeroFlags = {}): Promise<void> {
    this.requireWritable();
    if (!this.canZero) throw new RequestError('ENOTSUP', 'the server does not support NBD_CMD_WRITE_ZEROES');
    // "The client MUST NOT set this unless the server advertised NBD_FLAG_SEND_FAST_ZERO";
    // failing at once is exactly what a fast zero asks for.
    if (opts.fast === true && !this.canFastZero) throw new RequestError('ENOTSUP', 'the server does not support fast zero');
    this.checkRange(offset, length, 'ENOSPC');
    const extra = (opts.noHole === true ? NBD_CMD_FLAG_NO_HOLE : 0) | (opts.fast === true ? NBD_CMD_FLAG_FAST_ZERO : 0);
    await this.withFua(opts.fua, (fua) => this.split(offset, length, MAX_EFFECT_LENGTH, (off, len) => this.submit(NBD_CMD.WRITE_ZEROES, fua | extra, off, len)));
  }

  async cache(offset: number, length: number): Promise<void> {
    if (!this.canCache) throw new RequestError('ENOTSUP', 'the server does not support NBD_CMD_CACHE');
    this.checkRange(offset, length, 'EINVAL');
    await this.split(offset, length, MAX_EFFECT_LENGTH, (off, len) => this.submit(NBD_CMD.CACHE, 0, off, len));
  }

  /**
   * NBD_CMD_BLOCK_STATUS over [offset, offset+length) (one request: lengths above 1 GiB are
   * clipped, and the server may answer for less or, in the last extent, more).
   */
  async blockStatus(offset: number, length: number, opts: BlockStatusOptions = {}): Promise<BlockStatusReply> {
    if (this.contextNames.size === 0) throw new RequestError('ENOTSUP', 'no metadata context was negotiated');
    this.checkRange(offset, length, 'EINVAL');
    if (length === 0) throw new RequestError('EINVAL', 'block status of an empty range');
    const len = Math.min(length, MAX_EFFECT_LENGTH);
    const status = new Map<number, BlockDescriptor[]>();
    await this.submit(NBD_CMD.BLOCK_STATUS, opts.reqOne === true ? NBD_CMD_FLAG_REQ_ONE : 0, offset, len, { status });
    const out: BlockStatusReply = new Map();
    for (const [id, descriptors] of status) out.set(this.contextNames.get(id)!, descriptors);
    return out;
  }

  /** Soft disconnect: wait for requests in flight, send NBD_CMD_DISC, close. */
  async disconnect(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    await this.waitIdle();
    if (this.failure === null) {
      const header = Buffer.allocUnsafe(REQUEST_SIZE);
      encodeRequest(header, 0, { flags: 0, type: NBD_CMD.DISC, cookie: this.nextCookie++, offset: 0, length: 0 });
      this.session.wire.write(header);
      this.failure = new ImgbdError('ERR_NBD_DISCONNECTED', 'the client disconnected');
    }
    this.rejectWaiting(this.failure);
    await closeSocket(this.session.wire.socket);
  }

  /** Hard disconnect: fail everything in flight and drop the connection. */
  close(): void {
    this.closing = true;
    this.fatal(new ImgbdError('ERR_NBD_DISCONNECTED', 'the client closed the connection'));
  }

  // ---- request plumbing ----

  private requireWritable(): void {
    if (!this.canWrite) throw new RequestError('EPERM', 'the export is read-only');
  }

  private checkRange(offset: number, length: number, beyondEnd: NbdErrno): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new RequestError('EINVAL', `bad range offset=${offset} length=${length}`);
    }
    // "the client MUST NOT use a length which, when added to offset, would exceed the export size"
    if (offset + length > this.sizeBytes) {
      throw new RequestError(beyondEnd, `range [${offset}, ${offset + length}) is beyond the end of the ${this.sizeBytes}-byte export`);
    }
    // "the client MUST ensure that offset and length are integer multiples of any advertised minimum block size"
    const min = this.blockSizes.minimum;
    if (offset % min !== 0 || length % min !== 0) {
      throw new RequestError('EINVAL', `range [${offset}, ${offset + length}) is not aligned to the ${min}-byte minimum block size`);
    }
  }

  private async withFua(fua: boolean | undefined, op: (flags: number) => Promise<void>): Promise<void> {
    if (fua !== true) return op(0);
    if (this.canFua) return op(NBD_CMD_FLAG_FUA);
    // No native FUA: the write is durable once a flush after it completes. A server with
    // neither FUA nor flush has no write cache to flush (nbdkit and qemu-nbd advertise
    // flush whenever their backend can cache).
    await op(0);
    if (this.canFlush) await this.flush();
  }

  /** Run `fn` over pieces of at most `max` bytes; fails with the first error once all settled. */
  private async split(offset: number, length: number, max: number, fn: (off: number, len: number) => Promise<void>): Promise<void> {
    if (length === 0) return;
    if (length <= max) return fn(offset, length);
    const pieces: Promise<void>[] = [];
    for (let off = offset; off < offset + length; off += max) pieces.push(fn(off, Math.min(max, offset + length - off)));
    // Wait for every piece: a failed read must not return while others still write into the buffer.
    const results = await Promise.allSettled(pieces);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  private acquire(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.inFlight < this.maxInFlight) {
      this.inFlight++;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject }));
  }

  private release(): void {
    const next = this.waiting.shift();
    // The slot passes straight to the next waiter.
    if (next && this.failure === null) next.resolve();
    else {
      if (next) next.reject(this.failure!);
      this.inFlight--;
    }
    if (this.inFlight === 0 && this.waiting.length === 0) {
      for (const w of this.idleWaiters.splice(0)) w();
    }
  }

  private waitIdle(): Promise<void> {
    if (this.inFlight === 0 && this.waiting.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private rejectWaiting(err: Error): void {
    // A rejected waiter never got a slot, so there is nothing to release for it.
    for (const w of this.waiting.splice(0)) w.reject(err);
  }

  private async submit(cmd: number, flags: number, offset: number, length: number, extra: { payload?: Buffer; readInto?: Buffer; status?: Map<number, BlockDescriptor[]> } = {}): Promise<void> {
    await this.acquire();
    try {
      // Backpressure: wait until the socket has taken what earlier requests queued.
      while (this.drained !== null && this.failure === null) await this.drained;
      if (this.failure) throw this.failure;
      if (this.shutdownRequested) throw new RequestError('ESHUTDOWN', 'the server is shutting down');
      const cookie = this.nextCookie++;
      const header = Buffer.allocUnsafe(REQUEST_SIZE);
      encodeRequest(header, 0, { flags, type: cmd, cookie, offset, length });
      const done = new Promise<void>((resolve, reject) => {
        this.pending.set(cookie, {
          cookie,
          cmd,
          flags,
          offset,
          length,
          contentChunks: 0,
          ...(extra.readInto !== undefined ? { buf: extra.readInto, coverage: new ReadCoverage(offset, length) } : {}),
          ...(extra.status !== undefined ? { status: extra.status } : {}),
          resolve,
          reject,
        });
      });
      // Read data goes from the socket straight into the caller's buffer.
      if (cmd === NBD_CMD.READ) this.session.wire.parser.expectRead(cookie, { offset, length, ...(extra.readInto !== undefined ? { into: extra.readInto } : {}) });
      if (!this.session.wire.write(header, extra.payload)) this.waitForDrain();
      await done;
    } finally {
      this.release();
    }
  }

  private waitForDrain(): void {
    if (this.drained !== null) return;
    const socket = this.session.wire.socket;
    this.drained = new Promise<void>((resolve) => {
      const done = (): void => {
        socket.off('drain', done).off('close', done);
        this.drained = null;
        resolve();
      };
      socket.on('drain', done).on('close', done);
    });
  }

  // ---- replies (WireHandler) ----

  onEvent(ev: ReplyEvent): void {
    try {
      if (ev.kind === 'simple-reply') this.onSimpleReply(ev);
      else if (ev.kind === 'chunk') this.onChunk(ev);
      else throw violation(`unexpected ${ev.kind} in the transmission phase`);
    } catch (err) {
      this.fatal(err instanceof ProtocolError ? err : violation(String(err)));
    }
  }

  onFail(err: Error): void {
    // After a soft disconnect the server closing the socket is the expected end.
    this.fatal(this.closing && this.pending.size === 0 ? new ImgbdError('ERR_NBD_DISCONNECTED', 'the connection is closed') : err);
  }

  private lookup(cookie: bigint): Pending {
    const p = this.pending.get(cookie);
    // "the server MUST use the same value for cookie as was sent by the client"
    if (!p) throw violation(`reply for unknown cookie ${cookie}`);
    return p;
  }

  private onSimpleReply(ev: Extract<ReplyEvent, { kind: 'simple-reply' }>): void {
    const p = this.lookup(ev.cookie);
    // "MUST NOT use a simple reply for NBD_CMD_READ (even for the case of an early NBD_EINVAL)"
    if (this.structuredReplies && p.cmd === NBD_CMD.READ) throw violation('simple reply to NBD_CMD_READ although structured replies were negotiated');
    if (ev.error !== 0) {
      p.error = { errno: wireToErrno(ev.error), message: '' };
    } else if (p.cmd === NBD_CMD.READ) {
      placeData(ev.data!, p.buf!, 0);
    } else if (p.cmd === NBD_CMD.BLOCK_STATUS) {
      throw violation('simple success reply to NBD_CMD_BLOCK_STATUS');
    }
    this.complete(p);
  }

  private onChunk(ev: Extract<ReplyEvent, { kind: 'chunk' }>): void {
    const p = this.lookup(ev.cookie);
    this.applyChunk(p, ev.chunk);
    if (ev.done) this.complete(p);
  }

  private applyChunk(p: Pending, chunk: StructuredChunk): void {
    const name = CMD_NAMES.get(p.cmd) ?? `command ${p.cmd}`;
    switch (chunk.type) {
      case 'none':
        return;
      case 'offset-data':
      case 'offset-hole': {
        if (p.cmd !== NBD_CMD.READ) throw violation(`content chunk in reply to ${name}`);
        if ((p.flags & NBD_CMD_FLAG_DF) !== 0 && ++p.contentChunks > 1) throw violation('more than one content chunk for a read with NBD_CMD_FLAG_DF');
        const length = chunk.type === 'offset-data' ? chunk.data.length : chunk.length;
        p.coverage!.add(chunk.offset, length, chunk.type === 'offset-data' ? 'OFFSET_DATA' : 'OFFSET_HOLE');
        const at = chunk.offset - p.offset;
        if (chunk.type === 'offset-data') placeData(chunk.data, p.buf!, at);
        else p.buf!.fill(0, at, at + length);
        return;
      }
      case 'block-status': {
        if (p.cmd !== NBD_CMD.BLOCK_STATUS) throw violation(`block status chunk in reply to ${name}`);
        if (!this.contextNames.has(chunk.contextId)) throw violation(`block status for context id ${chunk.contextId}, which was not negotiated`);
        if (p.status!.has(chunk.contextId)) throw violation(`two block status chunks for context id ${chunk.contextId}`);
        const d = chunk.descriptors;
        if ((p.flags & NBD_CMD_FLAG_REQ_ONE) !== 0) {
          // "every reply chunk MUST contain exactly one descriptor, and that descriptor MUST NOT exceed the length of the original request"
          if (d.length !== 1 || d[0]!.length > p.length) throw violation('block status with NBD_CMD_FLAG_REQ_ONE must be one descriptor within the request');
        } else {
          // "the sum of the length fields of the first N-1 extents (if any) MUST be less than the requested length"
          let sum = 0;
          for (let i = 0; i < d.length - 1; i++) sum += d[i]!.length;
          if (d.length > 1 && sum >= p.length) throw violation('block status extents run past the requested length');
        }
        p.status!.set(chunk.contextId, d);
        return;
      }
      case 'error': {
        if (chunk.replyType === NBD_REPLY_TYPE.ERROR_OFFSET) {
          if (p.cmd === NBD_CMD.FLUSH) throw violation('NBD_REPLY_TYPE_ERROR_OFFSET in reply to NBD_CMD_FLUSH');
          if (chunk.offset! < p.offset || chunk.offset! >= p.offset + p.length) throw violation(`error offset ${chunk.offset} lies outside the request`);
        }
        // The first error wins; later ones (e.g. several ERROR_OFFSETs) add nothing the caller can use.
        p.error ??= { errno: chunk.errno, message: chunk.message };
        return;
      }
    }
  }

  private complete(p: Pending): void {
    this.pending.delete(p.cookie);
    if (p.error) {
      // "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect."
      if (p.error.errno === 'ESHUTDOWN') this.requestShutdown();
      const name = CMD_NAMES.get(p.cmd) ?? `command ${p.cmd}`;
      const detail = p.error.message !== '' ? `: ${p.error.message}` : '';
      p.reject(new RequestError(p.error.errno, `${name} [${p.offset}, +${p.length}) failed with ${p.error.errno}${detail}`));
      return;
    }
    let broken: ProtocolError | undefined;
    if (p.coverage && this.structuredReplies && !p.coverage.complete) {
      broken = violation(`read reply covered ${p.coverage.covered} of ${p.length} bytes`);
    } else if (p.status && p.status.size !== this.contextNames.size) {
      // "A successful block status request MUST have exactly one status chunk per negotiated metadata context ID."
      broken = violation(`block status reply has ${p.status.size} of ${this.contextNames.size} contexts`);
    }
    if (broken) {
      p.reject(broken);
      throw broken;
    }
    p.resolve();
  }

  private requestShutdown(): void {
    if (this.shutdownRequested) return;
    this.shutdownRequested = true;
    void this.disconnect().catch(() => undefined);
  }

  private fatal(err: Error): void {
    if (this.failure === null) this.failure = err;
    const failure = this.failure;
    for (const p of this.pending.values()) {
      this.session.wire.parser.forget(p.cookie);
      p.reject(failure);
    }
    this.pending.clear();
    this.rejectWaiting(failure);
    // Stops the parser too, so no reply after the violation is looked at.
    this.session.wire.abort(failure);
  }
}
