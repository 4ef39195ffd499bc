// The inside of a lane thread (see lanes.ts): opens its own copy of each export the main thread
// offers it, then serves the connections handed to it, in transmission from their first byte.
// Its entry script supplies the opener, so that this layer names no image format.

import { closeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import type { BlockDevice } from '../block/device.js';
import type { Connection } from './connection.js';
import type { FromLane, LaneData, ToLane } from './lane-messages.js';
import type { Logger } from './logger.js';
import { NbdServer } from './server.js';

/** Opens the image an export's `reopen` describes. */
export type LaneOpener = (reopen: unknown) => Promise<BlockDevice>;

export async function runLane(open: LaneOpener): Promise<void> {
  const port = parentPort;
  if (port === null) throw new Error('runLane runs in a worker thread');
  const data = workerData as LaneData;
  const post = (m: FromLane): void => port.postMessage(m);
  const logger: Logger = {
    info: (message) => post({ type: 'log', level: 'info', message }),
    warn: (message) => post({ type: 'log', level: 'warn', message }),
    error: (message) => post({ type: 'log', level: 'error', message }),
  };
  const devices: BlockDevice[] = [];
  let server: NbdServer;
  try {
    for (const e of data.exports) devices.push(await open(e.reopen));
    server = new NbdServer({
      exports: data.exports.map((e, i) => ({ name: e.name, description: e.description, device: devices[i]!, readOnly: e.readOnly, multiConn: e.multiConn })),
      logger,
      limits: data.limits,
      persistent: true,
    });
  } catch (e) {
    await Promise.allSettled(devices.map((d) => d.close()));
    post({ type: 'failed', message: (e as Error).message });
    port.close();
    return;
  }
  const connections = new Map<number, Connection>();
  let exiting = false;
  port.on('message', (m: ToLane) => {
    switch (m.type) {
      case 'serve': {
        let conn: Connection;
        try {
          conn = server.adopt(m.fd, m.exportName, { structured: m.structured, contexts: m.contexts, flags: m.flags, initial: Buffer.from(m.initial) });
        } catch (e) {
          logger.error(`connection thread: ${(e as Error).message}`);
          closeSync(m.fd);
          post({ type: 'adopted', id: m.id });
          post({ type: 'closed', id: m.id });
          return;
        }
        connections.set(m.id, conn);
        post({ type: 'adopted', id: m.id });
        void conn.closed.then(() => {
          connections.delete(m.id);
          post({ type: 'closed', id: m.id });
        });
        return;
      }
      case 'close': {
        const conn = connections.get(m.id);
        if (m.hard) conn?.destroy(m.reason, false);
        else conn?.beginClose(m.reason);
        return;
      }
      case 'exit':
        if (exiting) return;
        exiting = true;
        void server
          .close()
          .then(() => Promise.allSettled(devices.map((d) => d.close())))
          .finally(() => port.close());
        return;
    }
  });
  post({ type: 'ready' });
}
