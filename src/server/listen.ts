// Listening sockets for an NbdServer: a unix socket (mode 0600 from the moment it exists),
// TCP (127.0.0.1:10809 unless told otherwise), and sockets inherited from systemd
// (LISTEN_FDS / LISTEN_PID, starting at fd 3, sd_listen_fds(3)).

import { lstatSync, chmodSync, unlinkSync } from 'node:fs';
import { connect, createServer, type Server as NetServer } from 'node:net';
import { ImgbdError } from '../errors.js';
import type { NbdServer } from './server.js';

export const NBD_DEFAULT_PORT = 10809;
const SD_LISTEN_FDS_START = 3;

/** A listening socket; close() stops accepting (connections already made carry on). */
export interface Listener {
  readonly address: string;
  close(): Promise<void>;
}

function netServer(): NetServer {
  // Half-open: a client's FIN must not end our side before in-flight replies are out.
  return createServer({ allowHalfOpen: true, pauseOnConnect: false });
}

function listening(server: NetServer, start: () => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (e: Error): void => reject(new ImgbdError('ERR_LISTEN', `cannot listen: ${e.message}`, { cause: e }));
    server.once('error', onError);
    server.once('listening', () => {
      server.off('error', onError);
      resolve();
    });
    start();
  });
}

function closer(server: NetServer): () => Promise<void> {
  return () => new Promise((resolve) => (server.listening ? server.close(() => resolve()) : resolve()));
}

/** True when something accepts connections on the unix socket at `path`. */
function socketAlive(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/**
 * Listen on a unix socket at `path`, created with mode 0600. A stale socket file is removed
 * only when nothing listens on it; any other file there is an error.
 */
export async function listenUnix(nbd: NbdServer, path: string): Promise<Listener> {
  let existing;
  try {
    existing = lstatSync(path);
  } catch {
    existing = undefined;
  }
  if (existing !== undefined) {
    if (!existing.isSocket()) throw new ImgbdError('ERR_LISTEN', `${path} exists and is not a socket`);
    if (await socketAlive(path)) throw new ImgbdError('ERR_LISTEN', `${path} is in use by another server`);
    unlinkSync(path);
  }
  const server = netServer();
  // bind(2) creates the file with mode 0777 & ~umask: narrowing the umask around the
  // synchronous bind leaves no moment where the socket is wider than 0600.
  await listening(server, () => {
    const old = process.umask(0o177);
    try {
      server.listen(path);
    } finally {
      process.umask(old);
    }
  });
  chmodSync(path, 0o600);
  nbd.attach(server);
  const close = closer(server);
  return { address: path, close };
}

export interface TcpOptions {
  readonly host?: string;
  readonly port?: number;
}

export async function listenTcp(nbd: NbdServer, opts: TcpOptions = {}): Promise<Listener & { readonly port: number }> {
  const server = netServer();
  const host = opts.host ?? '127.0.0.1';
  await listening(server, () => server.listen({ host, port: opts.port ?? NBD_DEFAULT_PORT }));
  const addr = server.address();
  const port = typeof addr === 'object' && addr !== null ? addr.port : (opts.port ?? NBD_DEFAULT_PORT);
  nbd.attach(server);
  return { address: `${host}:${port}`, port, close: closer(server) };
}

/**
 * Listen on the sockets systemd passed (LISTEN_FDS, for this process per LISTEN_PID).
 * Returns none when there are none. The variables are cleared so children do not inherit them.
 */
export async function listenInherited(nbd: NbdServer, env: NodeJS.ProcessEnv = process.env): Promise<Listener[]> {
  const pid = Number(env.LISTEN_PID);
  const count = Number(env.LISTEN_FDS);
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (!Number.isInteger(count) || count <= 0 || pid !== process.pid) return [];
  const out: Listener[] = [];
  for (let fd = SD_LISTEN_FDS_START; fd < SD_LISTEN_FDS_START + count; fd++) {
    const server = netServer();
    await listening(server, () => server.listen({ fd }));
    nbd.attach(server);
    out.push({ address: `fd:${fd}`, close: closer(server) });
  }
  return out;
}
