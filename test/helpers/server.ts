// Starting an in-process NbdServer on a unix socket in a temporary directory, with cleanup
// registered before anything can fail.

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
