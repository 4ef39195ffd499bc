// The NBD server: named exports served over any number of listeners, fixed newstyle with
// NO_ZEROES (nbd-proto.md), optional TLS. It owns the connections, qemu-nbd's `--shared`
// limit and `--persistent` behaviour, and a graceful close(). Listening sockets are set up
// in listen.ts; the CLI decides what to do with the 'idle' and 'close' events.
//
// Events:
//   'connection' (id, peer)   a client was accepted
//   'idle'                    the last client went away (qemu-nbd exits here unless --persistent)
//   'close'                   close() finished: listeners closed, clients gone, exports flushed

import { EventEmitter } from 'node:events';
import type { Server as NetServer, Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import type { BlockSizes } from '../block/device.js';
import { UsageError } from '../errors.js';
import { BufferPool } from './buffer-pool.js';
import { Connection, DEFAULT_CONNECTION_LIMITS, type ConnectionHost, type ConnectionLimits } from './connection.js';
import { connectionFlags, ExportTable, type ExportConfig } from './exports.js';
import { TransmissionLanes } from './lanes.js';
import type { MetaContext } from './meta-context.js';
import { checkPollMaxUs, IdlePoller } from './idle-poller.js';
import { SILENT_LOGGER, type Logger } from './logger.js';
import type { TlsMode } from './negotiation.js';
import { upgradeToTls, type TlsCredentials } from './tls.js';

export interface NbdServerOptions {
  readonly exports: readonly ExportConfig[];
  /** The export an empty name selects when there are several (one export is always the default). */
  readonly defaultExport?: string;
  readonly logger?: Logger;
  /** qemu-nbd --shared: most clients at once; extra ones are closed on arrival. Default: no limit. */
  readonly maxConnections?: number;
  /**
   * qemu-nbd --persistent. When false, the server closes itself after its last client
   * disconnects (having had at least one). Default true: the CLI decides.
   */
  readonly persistent?: boolean;
  readonly tls?: { readonly mode: TlsMode; readonly credentials?: TlsCredentials };
  readonly limits?: Partial<ConnectionLimits>;
  /**
   * Once nothing is in progress, watch the clients' sockets this many microseconds before
   * sleeping (see IdlePoller). Default 0: never (see defaultPollMaxUs).
   */
  readonly pollMaxUs?: number;
  /**
   * Serve connections to the exports that have `reopen` on up to `threads` more threads (see
   * lanes.ts); `entry` is the threads' script. Default: everything on this thread.
   */
  readonly lanes?: { readonly entry: URL; readonly threads: number };
}

export interface ServeTransmissionOptions {
  /** The kernel client speaks simple replies only. */
  readonly structuredReplies?: boolean;
}

/** Where the handshake left a connection that another thread takes over (see lanes.ts). */
export interface AdoptedTransmission {
  readonly structured: boolean;
  readonly contexts: readonly MetaContext[];
  readonly flags: number;
  readonly initial: Buffer;
}

export class NbdServer extends EventEmitter {
  private readonly exportTable: ExportTable;
  private readonly logger: Logger;
  private readonly maxConnections: number;
  private readonly persistent: boolean;
  private readonly tlsMode: TlsMode;
  private readonly tlsCredentials: TlsCredentials | undefined;
  private readonly limits: ConnectionLimits;
  private readonly pool = new BufferPool();
  private readonly connections = new Set<Connection>();
  private readonly listeners_ = new Set<NetServer>();
  private everConnected = false;
  private closing: Promise<void> | undefined;
  private readonly host: ConnectionHost;
  private readonly poller: IdlePoller;
  private readonly lanes: TransmissionLanes | null = null;

  constructor(opts: NbdServerOptions) {
    super();
    this.limits = { ...DEFAULT_CONNECTION_LIMITS, ...opts.limits };
    if (opts.exports.length === 0) throw new UsageError('the server needs at least one export');
    this.exportTable = new ExportTable(opts.exports, this.limits.maxPayloadBytes, opts.defaultExport);
    this.logger = opts.logger ?? SILENT_LOGGER;
    this.maxConnections = opts.maxConnections ?? Number.POSITIVE_INFINITY;
    this.persistent = opts.persistent ?? true;
    this.tlsMode = opts.tls?.mode ?? 'off';
    this.tlsCredentials = opts.tls?.credentials;
    if (this.tlsMode !== 'off' && this.tlsCredentials === undefined) throw new UsageError(`TLS mode ${this.tlsMode} needs credentials`);
    const creds = this.tlsCredentials;
    this.poller = new IdlePoller(checkPollMaxUs(opts.pollMaxUs ?? 0), () => this.connections);
    this.host = {
      exports: this.exportTable,
      logger: this.logger,
      pool: this.pool,
      limits: this.limits,
      tlsMode: this.tlsMode,
      upgradeTls: (raw: Duplex): TLSSocket => upgradeToTls(raw, creds!),
      onClosed: (conn: Connection) => this.onConnectionClosed(conn),
      onActivity: () => this.poller.activity(),
      pickLane: (exp, conn) => this.lanes?.pick(exp.name, this.servedHere(conn)) ?? null,
    };
    const shared = opts.exports.filter((e) => e.reopen !== undefined);
    if (opts.lanes !== undefined && opts.lanes.threads > 0 && shared.length > 0) {
      this.lanes = new TransmissionLanes({
        entry: opts.lanes.entry,
        threads: opts.lanes.threads,
        exports: shared.map((e) => ({ name: e.name, description: e.description, readOnly: e.readOnly, multiConn: e.multiConn ?? true, reopen: e.reopen })),
        limits: this.limits,
        logger: this.logger,
      });
    }
  }

  /** Connections past their handshake on this thread, besides `asking`. */
  private servedHere(asking: Connection): number {
    let n = 0;
    for (const c of this.connections) if (c.servedHere && c !== asking) n++;
    return n;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Idle polls started, and those a client's bytes ended before the budget ran out. */
  get pollCounts(): { readonly polls: number; readonly found: number } {
    return this.poller.counts;
  }

  /** Serve clients arriving on `listener` (see listen.ts). */
  attach(listener: NetServer): void {
    this.listeners_.add(listener);
    listener.on('connection', (socket: Socket) => this.accept(socket));
  }

  /** Take a connected client through the handshake. */
  accept(socket: Socket | Duplex): void {
    if (this.closing !== undefined) {
      socket.destroy();
      return;
    }
    if (this.connections.size >= this.maxConnections) {
      this.logger.warn(`refusing a client: already serving ${this.connections.size} (limit ${this.maxConnections})`);
      socket.destroy();
      return;
    }
    this.track(new Connection(this.host, socket));
  }

  /**
   * Serve `exportName` on an already connected socket, or socket descriptor (which the server
   * then owns), with no handshake (the kernel's NBD client: userspace did the handshake, or
   * there was none). Resolves when the socket closes.
   */
  serveTransmission(socket: Duplex | number, exportName: string, opts: ServeTransmissionOptions = {}): Promise<void> {
    const exp = this.exportTable.lookup(exportName);
    if (exp === undefined) throw new UsageError(`no export named ${JSON.stringify(exportName)}`);
    const conn = new Connection(this.host, socket, { exp, structured: opts.structuredReplies ?? false });
    this.track(conn);
    return conn.closed;
  }

  /**
   * Serve a connection whose handshake another thread did (lanes.ts), from its socket
   * descriptor (which the server then owns).
   */
  adopt(fd: number, exportName: string, t: AdoptedTransmission): Connection {
    const exp = this.exportTable.lookup(exportName);
    if (exp === undefined) throw new UsageError(`no export named ${JSON.stringify(exportName)}`);
    const conn = new Connection(this.host, fd, { exp, ...t });
    this.track(conn);
    return conn;
  }

  /**
   * What a client of `exportName` is told: size, transmission flags and block sizes. The
   * kernel attach hands these to the kernel, which does no handshake of its own.
   */
  describeExport(exportName: string, opts: ServeTransmissionOptions = {}): { sizeBytes: number; transmissionFlags: number; blockSizes: BlockSizes } {
    const exp = this.exportTable.lookup(exportName);
    if (exp === undefined) throw new UsageError(`no export named ${JSON.stringify(exportName)}`);
    return { sizeBytes: exp.backend.sizeBytes, transmissionFlags: connectionFlags(exp, opts.structuredReplies ?? false), blockSizes: exp.sizes };
  }

  private track(conn: Connection): void {
    this.everConnected = true;
    this.connections.add(conn);
    this.emit('connection', conn.id, conn.peer);
  }

  private onConnectionClosed(conn: Connection): void {
    if (!this.connections.delete(conn)) return;
    if (this.connections.size > 0) return;
    this.emit('idle');
    if (!this.persistent && this.everConnected) void this.close();
  }

  /**
   * Stop accepting, let in-flight requests finish and their replies drain (clients still in
   * the handshake are dropped), flush every writable export, then resolve. Idempotent.
   */
  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    for (const l of this.listeners_) l.close();
    const waits: Promise<void>[] = [];
    for (const conn of this.connections) {
      conn.beginClose('the server is shutting down');
      waits.push(conn.closed);
    }
    await Promise.all(waits);
    for (const exp of this.exportTable.all()) {
      if (!exp.backend.capabilities().flush) continue;
      try {
        await exp.backend.flush();
      } catch (e) {
        this.logger.error(`flushing export ${JSON.stringify(exp.name)} on shutdown: ${(e as Error).message}`);
      }
    }
    await this.lanes?.close();
    this.emit('close');
  }
}
