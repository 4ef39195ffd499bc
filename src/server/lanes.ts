// Lanes: threads that serve connections once their handshake is done, so that the requests of
// several clients (nbdcopy opens one connection per thread to a multi-conn export) run on several cores,
// as nbdkit's threads do. One event loop moving write payloads into the page cache keeps one
// core busy; a second client then waits for it while the other core idles.
//
// The main thread keeps the listeners, every handshake, TLS connections and the exports a lane
// cannot open for itself (ExportConfig.reopen: only images whose every layer is stateless, so
// that two opens of one image see each other's writes at once, as two connections to one
// export must). A connection goes to the least loaded lane, the main thread counting as one.
// The lane opens the image anew (lane-host.ts) and serves the socket from a duplicate
// descriptor; the main thread keeps a stand-in Connection, so --shared, --persistent and a
// graceful shutdown still count and close every connection.

import { closeSync } from 'node:fs';
import type { Worker } from 'node:worker_threads';
import type { ConnectionLimits } from './connection.js';
import type { FromLane, LaneExport, LaneServe, ToLane } from './lane-messages.js';
import type { Logger } from './logger.js';
import { startWorker } from '../util/start-worker.js';

export interface LanesOptions {
  /** The lane threads' script (it calls runLane with an opener that understands `reopen`). */
  readonly entry: URL;
  readonly threads: number;
  readonly exports: readonly LaneExport[];
  readonly limits: ConnectionLimits;
  readonly logger: Logger;
}

/** A connection being served by a lane. */
export interface LaneLease {
  /** Soft (finish in-flight requests) or hard close, as Connection.beginClose / destroy. */
  close(reason: string, hard: boolean): void;
}

interface Pending {
  readonly fd: number;
  adopted: boolean;
  readonly onClosed: () => void;
}

/** How long a lane may take to finish its connections and exit before it is stopped. */
const EXIT_GRACE_MS = 30_000;

export class Lane {
  ready = false;
  /** Connections handed to this lane and not yet closed. */
  load = 0;
  private readonly worker: Worker;
  private readonly leases = new Map<number, Pending>();
  private nextId = 1;
  readonly exited: Promise<void>;

  constructor(
    /** Numbers the lanes from 1 in log lines (the main thread being 0). */
    readonly index: number,
    entry: URL,
    data: { exports: readonly LaneExport[]; limits: ConnectionLimits },
    private readonly logger: Logger,
  ) {
    this.worker = startWorker(entry, data);
    this.worker.on('message', (m: FromLane) => this.onMessage(m));
    this.worker.on('error', (err) => this.logger.error(`thread ${index} failed: ${err.message}`));
    this.exited = new Promise((resolve) => this.worker.once('exit', () => resolve()));
    void this.exited.then(() => this.onExit());
  }

  /** Serve a connection on this lane; `onClosed` runs once it is over. */
  handOff(serve: Omit<LaneServe, 'type' | 'id'>, onClosed: () => void): LaneLease {
    const id = this.nextId++;
    this.leases.set(id, { fd: serve.fd, adopted: false, onClosed });
    this.load++;
    this.post({ type: 'serve', id, ...serve });
    return { close: (reason, hard) => this.post({ type: 'close', id, reason, hard }) };
  }

  /** Let the lane finish its connections, then end it. */
  async exit(): Promise<void> {
    this.post({ type: 'exit' });
    const timer = setTimeout(() => void this.worker.terminate(), EXIT_GRACE_MS);
    await this.exited;
    clearTimeout(timer);
  }

  private post(m: ToLane): void {
    this.worker.postMessage(m);
  }

  private onMessage(m: FromLane): void {
    switch (m.type) {
      case 'ready':
        this.ready = true;
        this.logger.info(`thread ${this.index} ready to serve connections`);
        return;
      case 'failed':
        this.logger.warn(`thread ${this.index} serves no connections: ${m.message}`);
        return;
      case 'log':
        this.logger[m.level](`thread ${this.index}: ${m.message}`);
        return;
      case 'adopted': {
        const p = this.leases.get(m.id);
        if (p !== undefined) p.adopted = true;
        return;
      }
      case 'closed':
        this.settle(m.id);
        return;
    }
  }

  private settle(id: number): void {
    const p = this.leases.get(id);
    if (p === undefined) return;
    this.leases.delete(id);
    this.load--;
    p.onClosed();
  }

  /**
   * The thread is gone: its sockets closed with it. A descriptor it never took (the message was
   * still on its way) is closed here, so that the client sees the connection end.
   */
  private onExit(): void {
    this.ready = false;
    for (const [id, p] of [...this.leases]) {
      if (!p.adopted) closeQuietly(p.fd);
      this.settle(id);
    }
  }
}

export class TransmissionLanes {
  private readonly lanes: Lane[] = [];
  private readonly names: ReadonlySet<string>;

  constructor(opts: LanesOptions) {
    this.names = new Set(opts.exports.map((e) => e.name));
    const data = { exports: opts.exports, limits: opts.limits };
    for (let i = 1; i <= opts.threads; i++) this.lanes.push(new Lane(i, opts.entry, data, opts.logger));
  }

  /**
   * The lane for a new connection to `exportName`, or null to serve it on the main thread,
   * which already serves `mainLoad` connections: the least loaded ready lane when it has fewer.
   */
  pick(exportName: string, mainLoad: number): Lane | null {
    if (!this.names.has(exportName)) return null;
    let best: Lane | null = null;
    for (const lane of this.lanes) {
      if (lane.ready && lane.load < (best?.load ?? mainLoad)) best = lane;
    }
    return best;
  }

  async close(): Promise<void> {
    await Promise.all(this.lanes.map((l) => l.exit()));
  }
}

function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // Already closed.
  }
}
