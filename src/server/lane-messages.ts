// What the server's main thread and its lane threads (lanes.ts, lane-host.ts) say to each other.
// Everything here is structured-cloned; descriptors are plain numbers, valid in every thread
// because threads share the process's descriptor table.

import type { ConnectionLimits } from './connection.js';
import type { MetaContext } from './meta-context.js';

/** An export a lane can serve: what its ExportConfig says, and how the lane opens the image itself. */
export interface LaneExport {
  readonly name: string;
  readonly description?: string;
  readonly readOnly: boolean;
  readonly multiConn: boolean;
  /** Handed to the lane entry's opener (see LaneOpener): which image, and how. */
  readonly reopen: unknown;
}

export interface LaneData {
  readonly exports: readonly LaneExport[];
  readonly limits: ConnectionLimits;
}

/** A connection that finished its handshake on the main thread, moving to a lane. */
export interface LaneServe {
  readonly type: 'serve';
  readonly id: number;
  /** A duplicate of the connected socket, which the lane now owns. */
  readonly fd: number;
  readonly exportName: string;
  readonly structured: boolean;
  readonly contexts: readonly MetaContext[];
  /** The transmission flags the client was given. */
  readonly flags: number;
  /** Requests the main thread had already read (the client may send them right after the GO reply). */
  readonly initial: Uint8Array;
}

export type ToLane =
  | LaneServe
  | { readonly type: 'close'; readonly id: number; readonly reason: string; readonly hard: boolean }
  /** Finish every connection, close the images, and end the thread. */
  | { readonly type: 'exit' };

export type FromLane =
  | { readonly type: 'ready' }
  | { readonly type: 'failed'; readonly message: string }
  /** The lane owns the connection's descriptor now. */
  | { readonly type: 'adopted'; readonly id: number }
  | { readonly type: 'closed'; readonly id: number }
  | { readonly type: 'log'; readonly level: 'info' | 'warn' | 'error'; readonly message: string };
