// One client connection: the socket's lifecycle, handshake then transmission, flow control
// and timers. Requests run concurrently (command-runner.ts answers them); replies go out as
// they complete.
//
// Memory per connection is bounded: reading pauses while in-flight requests or bytes
// (request payloads, read buffers, replies not yet taken by the kernel) are over the
// limits, and resumes as replies drain. A client that stops reading its replies makes no
// progress on the socket; after `stallTimeoutMs` without progress it is dropped. A handshake
// that has not reached transmission within `handshakeTimeoutMs` is dropped (CVE-2024-7409:
// a stalled client must not pin the server, nor block its shutdown).

import { Socket, type OnReadOpts, type SocketConstructorOpts } from 'node:net';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import { type HostRun, type WriteOptions, type ZeroOptions } from '../block/device.js';
import { ProtocolError } from '../errors.js';
import {
  NBD_CMD,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
} from '../protocol/constants.js';
import { encodeServerGreeting } from '../protocol/handshake.js';
import { RequestParser, type ClientMessage, type RequestMessage } from '../protocol/request-parser.js';
import type { BufferPool } from './buffer-pool.js';
import type { Lane, LaneLease } from './lanes.js';
import { connectionFlags, type ExportTable, type ServedExport } from './exports.js';
import type { Logger } from './logger.js';
import type { MetaContext } from './meta-context.js';
import { Negotiator, type NegotiationAction, type TlsMode } from './negotiation.js';
import { duplicateFd } from '../sys/namespace.js';
import { zeroCopyAvailable } from '../sys/sendfile.js';
import { growSendBuffer } from '../sys/socket.js';
import { splicePipe, type SplicePipe } from '../sys/splice.js';
import { SplicedWrite } from './spliced-write.js';
import { CommandRunner, type RunnerConnection } from './command-runner.js';
import { ReplyWriter } from './replies.js';
import { validateRequest, type ValidationContext } from './validate.js';

export interface ConnectionLimits {
  /** Drop a client that has not entered transmission after this long. */
  readonly handshakeTimeoutMs: number;
  /** Drop a client whose socket makes no write progress for this long while replies wait. */
  readonly stallTimeoutMs: number;
  readonly maxInFlightRequests: number;
  /** Payloads, read buffers and unsent replies; reading pauses above this. */
  readonly maxInFlightBytes: number;
  readonly maxOptionBytes: number;
  /** Largest read/write payload accepted and advertised. */
  readonly maxPayloadBytes: number;
  /** Largest oversized write payload drained (refused with EINVAL) rather than disconnecting. */
  readonly maxDrainBytes: number;
  /** Unsent reply bytes above which no new request is started (resumes on 'drain'). */
  readonly maxReplyBacklogBytes: number;
  /** Structured reads at least this long ask the device for holes and send OFFSET_HOLE chunks. */
  readonly sparseReadMinBytes: number;
  /** Reads at least this long go from the page cache to the socket with sendfile(2) where they can. */
  readonly zeroCopyMinBytes: number;
}

export const DEFAULT_CONNECTION_LIMITS: ConnectionLimits = {
  handshakeTimeoutMs: 10_000,
  stallTimeoutMs: 60_000,
  maxInFlightRequests: 256,
  maxInFlightBytes: 128 * 1024 * 1024,
  maxOptionBytes: 64 * 1024,
  maxPayloadBytes: 32 * 1024 * 1024,
  maxDrainBytes: 64 * 1024 * 1024,
  sparseReadMinBytes: 64 * 1024,
  maxReplyBacklogBytes: 4 * 1024 * 1024,
  zeroCopyMinBytes: 64 * 1024,
};

/** What a connection needs from its server. */
export interface ConnectionHost {
  readonly exports: ExportTable;
  readonly logger: Logger;
  readonly pool: BufferPool;
  readonly limits: ConnectionLimits;
  readonly tlsMode: TlsMode;
  /** Wrap the raw socket in TLS after NBD_REP_ACK to NBD_OPT_STARTTLS. */
  upgradeTls(raw: Duplex): TLSSocket;
  onClosed(conn: Connection): void;
  /** This connection read or finished a request (see IdlePoller). */
  onActivity(): void;
  /** The lane thread to serve `conn`, a connection to `exp`, from here on; null keeps it on this thread. */
  pickLane?(exp: ServedExport, conn: Connection): Lane | null;
}

/** 'elsewhere': a lane thread serves the connection (lanes.ts); this one stands in for it. */
type Phase = 'handshake' | 'upgrading' | 'transmission' | 'closing' | 'elsewhere' | 'closed';

/** A connection that starts in transmission (see the constructor). */
export interface TransmissionStart {
  readonly exp: ServedExport;
  readonly structured: boolean;
  /** Metadata contexts negotiated elsewhere (by the main thread, for a lane). */
  readonly contexts?: readonly MetaContext[];
  /** The transmission flags the client was given; computed from the export when absent. */
  readonly flags?: number;
  /** Requests already read from the socket. */
  readonly initial?: Buffer;
}

const FUA: WriteOptions = Object.freeze({ fua: true });
const ZERO_OPTS: readonly ZeroOptions[] = Array.from({ length: 8 }, (_, i) =>
  Object.freeze({ mayTrim: (i & 1) !== 0, fast: (i & 2) !== 0, fua: (i & 4) !== 0 }),
);
/** Replies queued during the handshake above which the client is considered not to read. */
const HANDSHAKE_BACKLOG_BYTES = 1024 * 1024;

const EMPTY = Buffer.alloc(0);
/** Reads that are not into a write payload: Node's own size for stream reads. */
const READ_CHUNK_BYTES = 64 * 1024;
/** Write payloads at least this long are read in place (see RequestParser.fillTarget). */
const FILL_IN_PLACE_MIN_BYTES = 64 * 1024;
/** Write payloads at least this long go from the socket to a raw file by splice(2) (see SplicedWrite). */
const SPLICE_MIN_BYTES = 64 * 1024;
/**
 * Send buffer asked for on zero-copy connections. sendfile only takes what fits: with room for
 * many replies, a congested socket that drains to half empty takes whole replies again, rather
 * than a piece of one and a copied rest.
 */
const ZERO_COPY_SEND_BUFFER = 4 * 1024 * 1024;

let nextId = 1;

export class Connection {
  readonly id = nextId++;
  readonly peer: string;
  /** Resolves when the socket has closed. */
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;
  private socket: Duplex;
  private readonly host: ConnectionHost;
  private readonly limits: ConnectionLimits;
  private readonly parser: RequestParser;
  private readonly replies: ReplyWriter;
  private readonly negotiator: Negotiator | null;
  private phase: Phase = 'handshake';
  private exp: ServedExport | null = null;
  private structured = false;
  /** The socket's descriptor for sendfile(2); -1 when replies must go through the stream (TLS). */
  private sockFd = -1;
  /**
   * The descriptor of a plain socket whose reads we direct (ownSocket), for splicing write
   * payloads out of it; -1 otherwise.
   */
  private spliceFd = -1;
  /** The write whose payload is being spliced; the stream reads nothing else meanwhile. */
  private spliced: SplicedWrite | null = null;
  /** The spliced payload is not all here: the stream reads one byte of it when more arrives. */
  private spliceWaiting = false;
  private readonly wakeByte = Buffer.alloc(1);
  /** Set by takePayload for the write the parser returns next. */
  private spliceNext: { readonly target: HostRun; readonly pipe: SplicePipe } | null = null;
  /** Memory for reads not into a payload, reused while nothing refers to it (see nextReadBuffer). */
  private staging: Buffer | null = null;
  private stagingViews = 0;
  /** The write payload the socket is reading into (see nextReadBuffer). */
  private fillBuffer: Buffer | null = null;
  /** Moving to a socket of our own: nothing is read until it is done. */
  private rehoming = false;
  /** The socket reads where nextReadBuffer says (ownSocket): a spliced payload is never read into memory by mistake. */
  private ownsReads = false;
  /** Runs the requests, from the start of transmission. */
  private runner: CommandRunner | null = null;
  private vctx: ValidationContext = { flags: 0, maxPayloadBytes: 0, metaContexts: 0 };
  private inFlight = 0;
  private inFlightBytes = 0;
  private paused = false;
  private pumping = false;
  private handshakeTimer: NodeJS.Timeout | undefined;
  private stallTimer: NodeJS.Timeout | undefined;
  private stallMark = -1;
  private closeReason = '';
  /** The lane serving this connection (phase 'elsewhere'). */
  private lease: LaneLease | null = null;

  /**
   * Start on `socket`, or on a connected socket descriptor this connection then owns (and
   * reads into its own buffers): with `transmission`, skip the handshake (the kernel client
   * talks transmission only) and serve that export at once.
   */
  constructor(host: ConnectionHost, socketOrFd: Duplex | number, transmission?: TransmissionStart) {
    this.host = host;
    this.limits = host.limits;
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    this.parser = new RequestParser(transmission ? 'transmission' : 'client-flags', {
      maxOptionBytes: this.limits.maxOptionBytes,
      maxPayloadBytes: this.limits.maxPayloadBytes,
      maxDrainBytes: this.limits.maxDrainBytes,
      allocPayload: (n) => host.pool.acquire(n),
      fillInPlaceMinBytes: FILL_IN_PLACE_MIN_BYTES,
      takePayload: this.takePayload,
    });
    const socket = typeof socketOrFd === 'number' ? this.ownSocket(socketOrFd) : socketOrFd;
    this.socket = socket;
    const s = socket as Partial<Socket>;
    this.peer = s.remoteAddress !== undefined ? `${s.remoteAddress}:${s.remotePort}` : 'unix';
    this.replies = new ReplyWriter(socket, host.pool, () => this.inFlight <= 1 && this.parser.buffered === 0);
    this.attach(socket);
    if (transmission) {
      this.negotiator = null;
      const { exp, structured } = transmission;
      this.enterTransmission(exp, structured, transmission.contexts ?? [], transmission.flags ?? connectionFlags(exp, structured));
      if (transmission.initial !== undefined && transmission.initial.length > 0) {
        this.parser.push(transmission.initial);
        this.pump();
      }
    } else {
      this.negotiator = new Negotiator(host.exports, host.tlsMode, this.sendRaw);
      this.handshakeTimer = setTimeout(this.onHandshakeTimeout, this.limits.handshakeTimeoutMs);
      this.handshakeTimer.unref();
      socket.write(encodeServerGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
    }
  }

  get inTransmission(): boolean {
    return this.phase === 'transmission';
  }

  /** Served on this thread, past the handshake (a lane's load is counted against these). */
  get servedHere(): boolean {
    return this.phase === 'transmission' || this.phase === 'closing';
  }

  /**
   * IdlePoller: only the client can move things on. Nothing is in progress but, at most, the
   * write whose payload is still arriving; nothing is waiting to be sent or parsed.
   */
  get idle(): boolean {
    if (this.phase !== 'transmission' || this.parser.buffered !== 0 || this.socket.writableLength !== 0) return false;
    return this.spliced === null ? this.inFlight === 0 : this.spliceWaiting && this.inFlight === 1;
  }

  /** IdlePoller: the socket to watch for the next request, when we read it ourselves. */
  get pollFd(): number {
    return this.spliceFd;
  }

  // ---- socket plumbing --------------------------------------------------------------------

  private attach(socket: Duplex): void {
    socket.on('data', this.onData);
    socket.on('drain', this.onDrain);
    socket.on('end', this.onEnd);
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
    (socket as Partial<Socket>).setNoDelay?.(true);
  }

  private detach(socket: Duplex): void {
    socket.off('data', this.onData);
    socket.off('drain', this.onDrain);
    socket.off('end', this.onEnd);
    socket.off('error', this.onError);
    socket.off('close', this.onClose);
  }

  private readonly sendRaw = (buf: Buffer): void => {
    this.socket.write(buf);
  };

  private readonly onData = (chunk: Buffer): void => {
    this.parser.push(chunk);
    this.pump();
  };

  /**
   * Where the socket reads next: straight into the payload of a large write being received,
   * else a fresh buffer (views into it may outlive the read, as payloads of small writes).
   */
  private readonly nextReadBuffer = (): Buffer => {
    if (this.spliceWaiting) return this.wakeByte;
    const target = this.parser.fillTarget();
    this.fillBuffer = target;
    if (target !== null) return target;
    const size = this.parser.nextReadBytes(READ_CHUNK_BYTES);
    // A stream of requests without payloads (reads) keeps reading into the same memory.
    if (this.staging === null || this.parser.buffered > 0 || this.parser.viewsOut !== this.stagingViews) {
      this.staging = Buffer.allocUnsafeSlow(READ_CHUNK_BYTES);
      this.stagingViews = this.parser.viewsOut;
    }
    return this.staging.subarray(0, size);
  };

  private readonly onReadInto = (n: number, buf: Uint8Array): boolean => {
    if (this.spliced !== null) {
      this.resumeSplice((buf as Buffer).subarray(0, n));
      this.host.onActivity();
      return true;
    }
    if (buf === this.fillBuffer) this.parser.filled(n);
    else this.parser.push((buf as Buffer).subarray(0, n));
    this.pump();
    this.host.onActivity();
    // Flow control pauses and resumes the socket itself.
    return true;
  };

  private readonly onDrain = (): void => {
    this.pump();
  };

  private readonly onEnd = (): void => {
    if (this.spliced !== null) {
      this.abortSplice('client closed in the middle of a write payload');
      return;
    }
    // The client will send nothing more; finish what is in flight, then close our side.
    if (this.phase === 'handshake' || this.phase === 'upgrading') {
      this.destroy('client closed during the handshake', false);
      return;
    }
    this.beginClose('client closed its side');
  };

  private readonly onError = (err: Error): void => {
    // 'close' follows. A failed TLS handshake is worth a line (bad credentials, wrong CA).
    if (this.phase === 'upgrading') this.host.logger.warn(`connection ${this.id} (${this.peer}): TLS handshake failed: ${err.message}`);
    if (this.closeReason === '') this.closeReason = `socket error: ${err.message}`;
  };

  private readonly onClose = (): void => {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    this.clearTimers();
    this.parser.reset('transmission');
    this.host.onClosed(this);
    this.resolveClosed();
  };

  private readonly onHandshakeTimeout = (): void => {
    if (this.phase === 'handshake' || this.phase === 'upgrading') this.destroy(`handshake not finished within ${this.limits.handshakeTimeoutMs} ms`, true);
  };

  private readonly onStallCheck = (): void => {
    this.stallTimer = undefined;
    const backlog = this.socket.writableLength;
    if (backlog === 0 || (this.phase !== 'transmission' && this.phase !== 'closing' && this.phase !== 'handshake')) return;
    if (this.stallMark >= 0 && backlog >= this.stallMark) {
      this.destroy(`client has not read its replies for ${this.limits.stallTimeoutMs} ms`, true);
      return;
    }
    this.stallMark = backlog;
    this.armStallTimer(false);
  };

  /** Watch for write progress; `fresh` starts a new watch (rather than continuing one). */
  private armStallTimer(fresh = true): void {
    if (this.stallTimer !== undefined) return;
    if (fresh) this.stallMark = -1;
    this.stallTimer = setTimeout(this.onStallCheck, this.limits.stallTimeoutMs);
    this.stallTimer.unref();
  }

  private clearTimers(): void {
    if (this.handshakeTimer !== undefined) clearTimeout(this.handshakeTimer);
    if (this.stallTimer !== undefined) clearTimeout(this.stallTimer);
    this.handshakeTimer = undefined;
    this.stallTimer = undefined;
  }

  /** Hard disconnect: one log line, the socket goes now. */
  destroy(reason: string, warn: boolean): void {
    if (this.phase === 'closed') return;
    if (this.phase === 'elsewhere') {
      this.lease!.close(reason, true);
      return;
    }
    if (warn) this.host.logger.warn(`connection ${this.id} (${this.peer}): ${reason}`);
    this.closeReason ||= reason;
    this.phase = 'closing';
    this.dropSplice();
    this.clearTimers();
    this.socket.destroy();
  }

  /**
   * Soft close: no more requests are read; once every in-flight request has replied the
   * socket is ended. A client that never reads the replies is cut off by the stall timer.
   */
  beginClose(reason: string): void {
    if (this.phase === 'closed') return;
    if (this.phase === 'elsewhere') {
      this.lease!.close(reason, false);
      return;
    }
    if (this.phase === 'handshake' || this.phase === 'upgrading') {
      this.destroy(reason, false);
      return;
    }
    if (this.phase !== 'closing') {
      this.phase = 'closing';
      this.closeReason ||= reason;
    }
    // A write being spliced is in flight: the rest of its payload is still read.
    this.setPaused(!this.spliceWaiting);
    this.maybeFinishClose();
  }

  private maybeFinishClose(): void {
    if (this.phase !== 'closing' || this.inFlight > 0 || this.socket.writableEnded || this.socket.destroyed) return;
    const socket = this.socket;
    // Nothing more will be read: once the replies are out, the socket can go entirely.
    socket.once('finish', () => socket.destroy());
    socket.end();
    if (socket.writableLength > 0) this.armStallTimer();
  }

  private setPaused(paused: boolean): void {
    if (paused === this.paused) return;
    this.paused = paused;
    if (paused) this.socket.pause();
    else this.socket.resume();
  }

  // ---- the message pump -------------------------------------------------------------------

  private blocked(): boolean {
    switch (this.phase) {
      case 'handshake':
        return this.socket.writableLength > HANDSHAKE_BACKLOG_BYTES;
      case 'transmission':
        return (
          this.rehoming ||
          this.spliced !== null ||
          this.inFlight >= this.limits.maxInFlightRequests ||
          this.inFlightBytes + this.socket.writableLength > this.limits.maxInFlightBytes ||
          // Replies the client has not taken yet: starting more work would only grow the queue
          // and thrash the cache with buffers that cannot leave anyway.
          this.socket.writableLength > this.limits.maxReplyBacklogBytes
        );
      default:
        return true;
    }
  }

  private pump(): void {
    // Re-entry (a reply written synchronously emitting 'drain') must not reorder messages.
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (!this.blocked()) {
        let m: ClientMessage | null;
        try {
          m = this.parser.next();
        } catch (e) {
          this.destroy(e instanceof ProtocolError ? e.message : String(e), true);
          return;
        }
        if (m === null) break;
        if (this.phase === 'handshake') this.handleHandshake(m);
        else this.handleRequest(m as RequestMessage);
      }
    } finally {
      this.pumping = false;
    }
    this.updateFlow();
  }

  private updateFlow(): void {
    if (this.phase !== 'handshake' && this.phase !== 'transmission') return;
    const blocked = this.blocked();
    this.setPaused(blocked && !this.spliceWaiting);
    if (blocked && this.socket.writableLength > 0) this.armStallTimer();
  }

  // ---- handshake --------------------------------------------------------------------------

  private handleHandshake(m: ClientMessage): void {
    const neg = this.negotiator!;
    let action: NegotiationAction;
    switch (m.kind) {
      case 'client-flags': {
        const bad = neg.clientFlags(m.flags);
        if (bad !== null) this.destroy(bad, true);
        return;
      }
      case 'option':
        action = neg.handle({ option: m.option, data: m.data, length: m.data.length });
        break;
      case 'option-too-big':
        action = neg.handle({ option: m.option, data: undefined, length: m.length });
        break;
      default:
        this.destroy('request during the handshake', true);
        return;
    }
    switch (action.kind) {
      case 'continue':
        return;
      case 'abort':
        this.phase = 'closing';
        this.maybeFinishClose();
        return;
      case 'disconnect':
        this.destroy(action.reason, true);
        return;
      case 'starttls':
        this.startTls();
        return;
      case 'transmission':
        this.enterTransmission(action.exp, action.structured, action.contexts, action.flags);
        return;
    }
  }

  private startTls(): void {
    // The client MUST wait for our ACK before starting TLS: anything already here is garbage.
    if (this.parser.buffered > 0) {
      this.destroy('data after NBD_OPT_STARTTLS before the TLS handshake', true);
      return;
    }
    this.phase = 'upgrading';
    const raw = this.socket;
    this.detach(raw);
    // Errors on the raw stream surface on the TLS socket; keep the raw one from throwing.
    raw.on('error', () => {});
    let secure: TLSSocket;
    try {
      secure = this.host.upgradeTls(raw);
    } catch (e) {
      this.socket = raw;
      this.attach(raw);
      this.destroy(`TLS setup failed: ${(e as Error).message}`, true);
      return;
    }
    this.socket = secure;
    this.replies.retarget(secure);
    this.paused = false;
    this.attach(secure);
    secure.once('secure', () => {
      if (this.phase !== 'upgrading') return;
      this.host.logger.info(`connection ${this.id}: TLS up (${secure.getProtocol() ?? '?'}, ${secure.getCipher()?.name ?? '?'})`);
      this.phase = 'handshake';
      this.negotiator!.tlsStarted();
      this.parser.reset('options');
      this.pump();
    });
  }

  private enterTransmission(exp: ServedExport, structured: boolean, contexts: readonly MetaContext[], flags: number): void {
    if (this.handshakeTimer !== undefined) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = undefined;
    this.phase = 'transmission';
    this.exp = exp;
    this.structured = structured;
    this.runner = new CommandRunner(this.runnerConnection(), exp.backend, {
      structured,
      contexts,
      zeroCopyMinBytes: this.limits.zeroCopyMinBytes,
      sparseReadMinBytes: this.limits.sparseReadMinBytes,
    });
    this.vctx = { flags, maxPayloadBytes: exp.sizes.maximum, metaContexts: contexts.length };
    this.parser.enterTransmission();
    const fd = plainSocketFd(this.socket);
    if (fd >= 0 && this.negotiator !== null && this.socket instanceof Socket) {
      const lane = this.host.pickLane?.(exp, this) ?? null;
      if (lane !== null) this.moveToLane(this.socket, fd, lane, contexts, flags);
      else this.moveToOwnSocket(this.socket, fd);
    } else {
      this.useSocketFd(fd);
    }
  }

  /**
   * Hand the connection to `lane` (see lanes.ts): once the handshake's last reply has left, the
   * lane gets a duplicate of the socket and the requests already read; this thread's socket
   * closes, and this object stands in for the connection until the lane reports it over.
   */
  private moveToLane(old: Socket, fd: number, lane: Lane, contexts: readonly MetaContext[], flags: number): void {
    this.rehome(old, fd, (dup) => {
      this.phase = 'elsewhere';
      this.clearTimers();
      this.host.logger.info(`connection ${this.id}: served on thread ${lane.index}`);
      const serve = { fd: dup, exportName: this.exp!.name, structured: this.structured, contexts, flags, initial: this.parser.takeBuffered() };
      this.lease = lane.handOff(serve, this.onLaneClosed);
    });
  }

  private readonly onLaneClosed = (): void => {
    this.phase = 'closed';
    this.host.onClosed(this);
    this.resolveClosed();
  };

  private useSocketFd(fd: number): void {
    this.spliceFd = fd >= 0 && this.socket instanceof Socket && this.ownsReads ? fd : -1;
    this.sockFd = fd >= 0 && zeroCopyAvailable() ? fd : -1;
    if (this.sockFd >= 0) growSendBuffer(this.sockFd, ZERO_COPY_SEND_BUFFER);
  }

  /** A socket on `fd` that reads where nextReadBuffer says. */
  private ownSocket(fd: number): Socket {
    // `onread` is a Socket constructor option since Node 12; the typings only list it for connect().
    const opts: SocketConstructorOpts & { onread: OnReadOpts } = { fd, readable: true, writable: true, onread: { buffer: this.nextReadBuffer, callback: this.onReadInto } };
    const socket = new Socket(opts);
    this.ownsReads = true;
    return socket;
  }

  /**
   * Carry on over a socket of our own on the same connection (a duplicate descriptor), created
   * so that it reads into buffers we choose: a large write's payload then lands where it is
   * written from, with no copy. The handshake's last reply leaves first; requests the client
   * has already sent stay in the kernel, or in the old socket's buffer, and are carried over.
   */
  private moveToOwnSocket(old: Socket, fd: number): void {
    this.rehome(old, fd, (dup) => {
      const own = this.ownSocket(dup);
      this.socket = own;
      this.replies.retarget(own);
      this.paused = false;
      this.attach(own);
      this.useSocketFd(plainSocketFd(own));
      this.pump();
    });
  }

  /**
   * Once the handshake's last reply has left `old`, hand a duplicate of its descriptor to
   * `carryOn` and retire `old`, what it had read going to the parser. Nothing is read meanwhile.
   * Should the descriptor not duplicate, the connection stays on `old`.
   */
  private rehome(old: Socket, fd: number, carryOn: (dup: number) => void): void {
    this.rehoming = true;
    old.pause();
    const move = (): void => {
      this.rehoming = false;
      if (this.phase !== 'transmission' || old.destroyed) return;
      let dup: number;
      try {
        dup = duplicateFd(fd);
      } catch (e) {
        this.host.logger.warn(`connection ${this.id}: staying on the accepted socket: ${(e as Error).message}`);
        this.useSocketFd(fd);
        this.pump();
        return;
      }
      for (let c = old.read() as Buffer | null; c !== null; c = old.read() as Buffer | null) this.parser.push(c);
      this.detach(old);
      old.on('error', () => {});
      old.destroy();
      carryOn(dup);
    };
    if (old.writableLength === 0) move();
    else old.write(EMPTY, move);
  }

  // ---- transmission -----------------------------------------------------------------------

  private handleRequest(m: RequestMessage): void {
    const { type, flags, cookie, offset, length } = m;
    if (type === NBD_CMD.DISC) {
      // "The server MUST handle all outstanding requests ... and close the TCP session."
      this.beginClose('client disconnected');
      return;
    }
    if (m.oversized) {
      this.replies.error(cookie, 'EINVAL', `write of ${length} bytes exceeds the maximum payload ${this.vctx.maxPayloadBytes}`, this.structured);
      return;
    }
    if (m.taken !== undefined) {
      this.startSplice(m);
      return;
    }
    const bad = validateRequest(type, flags, offset, length, this.vctx);
    if (bad !== null) {
      this.replies.error(cookie, bad.errno, bad.message, this.structured);
      return;
    }
    const backend = this.exp!.backend;
    const runner = this.runner!;
    const fua = (flags & NBD_CMD_FLAG_FUA) !== 0 ? FUA : undefined;
    switch (type) {
      case NBD_CMD.READ:
        this.start(length);
        runner.read(cookie, offset, length, (flags & NBD_CMD_FLAG_DF) !== 0);
        return;
      case NBD_CMD.WRITE:
        this.start(length);
        // A payload read into the socket's buffer and written already: the buffer may be read into again.
        if (runner.write(cookie, offset, m.payload!, fua, m.payloadOwner) && m.payloadOwner === undefined) this.parser.returnView();
        return;
      case NBD_CMD.FLUSH:
        this.start(0);
        void runner.simple(cookie, type, 0, backend.flush());
        return;
      case NBD_CMD.TRIM:
        this.start(0);
        void runner.simple(cookie, type, 0, backend.trim(offset, length, fua));
        return;
      case NBD_CMD.CACHE:
        this.start(0);
        void runner.simple(cookie, type, 0, backend.cache(offset, length));
        return;
      case NBD_CMD.WRITE_ZEROES: {
        const i = ((flags & NBD_CMD_FLAG_NO_HOLE) === 0 ? 1 : 0) | ((flags & NBD_CMD_FLAG_FAST_ZERO) !== 0 ? 2 : 0) | (fua ? 4 : 0);
        this.start(0);
        void runner.simple(cookie, type, 0, backend.zero(offset, length, ZERO_OPTS[i]));
        return;
      }
      case NBD_CMD.BLOCK_STATUS:
        this.start(0);
        void runner.blockStatus(cookie, offset, length, (flags & NBD_CMD_FLAG_REQ_ONE) !== 0);
        return;
    }
  }

  private start(bytes: number): void {
    this.inFlight++;
    this.inFlightBytes += bytes;
  }

  private finish(bytes: number): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    if (this.phase === 'closing') this.maybeFinishClose();
    else if (this.paused || this.parser.buffered > 0) this.pump();
    this.host.onActivity();
  }

  // ---- spliced writes ---------------------------------------------------------------------

  /** RequestParser.takePayload: a valid write to a plain file, on a socket whose reads we direct. */
  private readonly takePayload = (offset: number, length: number, flags: number): boolean => {
    if (this.spliceFd < 0 || length < SPLICE_MIN_BYTES || this.phase !== 'transmission' || this.spliced !== null) return false;
    if (validateRequest(NBD_CMD.WRITE, flags, offset, length, this.vctx) !== null) return false;
    const target = this.exp!.backend.hostWriteRun(offset, length, (flags & NBD_CMD_FLAG_FUA) !== 0 ? FUA : undefined);
    if (target === null || target.length !== length) return false;
    const pipe = splicePipe();
    if (pipe === null) return false;
    this.spliceNext = { target, pipe };
    return true;
  };

  private startSplice(m: RequestMessage): void {
    const next = this.spliceNext!;
    this.spliceNext = null;
    const w = new SplicedWrite(m.cookie, m.length, (m.flags & NBD_CMD_FLAG_FUA) !== 0, next.pipe, next.target);
    this.start(m.length);
    // From here the stream reads nothing of the payload: the moves below are synchronous, and a
    // payload still on its way is waited for with the wake-up byte (nextReadBuffer).
    this.spliced = w;
    try {
      w.take(m.taken!);
    } catch (e) {
      this.abortSplice(`write payload: ${(e as Error).message}`);
      return;
    }
    this.continueSplice();
  }

  /**
   * The stream read while a payload was awaited: usually the wake-up byte, but a read buffer
   * chosen before the splice began (it started outside a read) may hold more of the payload,
   * and what follows it.
   */
  private resumeSplice(data: Buffer): void {
    const w = this.spliced!;
    this.spliceWaiting = false;
    const mine = Math.min(data.length, w.remainingBytes);
    try {
      w.take(data.subarray(0, mine));
    } catch (e) {
      this.abortSplice(`write payload: ${(e as Error).message}`);
      return;
    }
    this.continueSplice(data.subarray(mine));
  }

  /** `after`: bytes already read that follow the payload (the next requests). */
  private continueSplice(after?: Buffer): void {
    const w = this.spliced!;
    let progress;
    try {
      progress = w.advance(this.spliceFd);
    } catch (e) {
      this.abortSplice(`write payload: ${(e as Error).message}`);
      return;
    }
    if (progress === 'wait') {
      this.spliceWaiting = true;
      // Read on even where flow control had paused the stream: only this payload is read.
      this.setPaused(false);
      return;
    }
    if (progress === 'eof') {
      this.abortSplice('client closed in the middle of a write payload');
      return;
    }
    this.spliced = null;
    if (after !== undefined && after.length > 0) this.parser.push(Buffer.from(after));
    void this.completeSplice(w);
  }

  private async completeSplice(w: SplicedWrite): Promise<void> {
    try {
      if (w.error !== null) throw w.error;
      if (w.fua) await this.exp!.backend.flush();
      if (this.writable) this.replies.simpleOkNow(w.cookie, this.sockFd);
    } catch (e) {
      this.runner!.failed(w.cookie, NBD_CMD.WRITE, e);
    } finally {
      this.finish(w.length);
    }
  }

  /** The payload cannot be had: the stream is out of step, so the connection goes. */
  private abortSplice(reason: string): void {
    this.dropSplice();
    this.destroy(reason, true);
  }

  private dropSplice(): void {
    this.spliced?.abandon();
    this.spliced = null;
    this.spliceWaiting = false;
  }

  private get writable(): boolean {
    return (this.phase === 'transmission' || this.phase === 'closing') && !this.socket.destroyed;
  }

  private runnerConnection(): RunnerConnection {
    return {
      id: this.id,
      pool: this.host.pool,
      logger: this.host.logger,
      replies: this.replies,
      writable: () => this.writable,
      sockFd: () => this.sockFd,
      queuedBytes: () => this.socket.writableLength,
      afterQueue: (done) => this.socket.write(EMPTY, done),
      finish: (bytes) => this.finish(bytes),
    };
  }
}

/** The descriptor of a plain unix or TCP socket; -1 for anything else (TLS, a test stream). */
function plainSocketFd(socket: Duplex): number {
  if ((socket as Partial<TLSSocket>).encrypted === true) return -1;
  const fd = (socket as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : -1;
}
