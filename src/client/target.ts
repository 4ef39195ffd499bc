// What to connect to and how: an NBD URI or an explicit address, merged with options.
// URI query parameters supply defaults; explicit options win.

import { UsageError } from '../errors.js';
import { parseNbdUri, NBD_DEFAULT_PORT, type NbdUri } from '../protocol/uri.js';

export interface NbdTlsOptions {
  /** Directory with ca-cert.pem and, optionally, client-cert.pem + client-key.pem. */
  readonly certificatesDir?: string;
  readonly caFile?: string;
  readonly certFile?: string;
  readonly keyFile?: string;
  /** PSK key file, lines of `username:hexkey` (the nbdkit --tls-psk and qemu tls-creds-psk format). */
  readonly pskFile?: string;
  /** PSK identity; defaults to the local user name. */
  readonly username?: string;
  /** Verify the server certificate (default true). */
  readonly verifyPeer?: boolean;
  /** Name to check the certificate against (default: the TCP host; none for unix sockets). */
  readonly hostname?: string;
}

export interface NbdAddress {
  readonly socket?: string;
  readonly host?: string;
  readonly port?: number;
  readonly exportName?: string;
  /** TLS is mandatory. */
  readonly tls?: boolean;
}

export interface NbdConnectOptions {
  readonly exportName?: string;
  /** Request TLS (mandatory once asked for: no silent downgrade). */
  readonly tls?: NbdTlsOptions;
  readonly structuredReplies?: boolean;
  readonly metaContexts?: readonly string[];
  /** Ask for NBD_INFO_BLOCK_SIZE/NAME/DESCRIPTION in NBD_OPT_GO (and obey the block sizes). */
  readonly requestInfo?: boolean;
  /** Requests on the wire at once; further requests wait in a queue. */
  readonly maxInFlight?: number;
  /** Largest read or write sent as one request, further capped by the server's maximum. */
  readonly maxRequestBytes?: number;
  /** Give up on a server that has not completed the handshake after this long (default 30 s). */
  readonly handshakeTimeoutMs?: number;
}

export interface ResolvedTarget {
  readonly socket?: string;
  readonly host?: string;
  readonly port: number;
  readonly exportName: string;
  readonly tls?: NbdTlsOptions;
  readonly handshakeTimeoutMs?: number;
}

export type NbdTargetInput = string | NbdUri | NbdAddress;

function fromUri(u: NbdUri): { addr: NbdAddress; tls?: NbdTlsOptions } {
  // tls-type only cross-checks the credentials given: which kind is used follows from them.
  if (u.tlsType === 'anon') throw new UsageError('anonymous TLS (tls-type=anon) is not supported: it does not authenticate the server');
  if (u.tlsType === 'psk' && u.tlsPskFile === undefined) throw new UsageError('tls-type=psk needs tls-psk-file');
  if (u.tlsType === 'x509' && u.tlsPskFile !== undefined) throw new UsageError('tls-type=x509 conflicts with tls-psk-file');
  const tlsWanted = u.tls || u.tlsCertificates !== undefined || u.tlsPskFile !== undefined;
  const tls: NbdTlsOptions | undefined = tlsWanted
    ? {
        ...(u.tlsCertificates !== undefined ? { certificatesDir: u.tlsCertificates } : {}),
        ...(u.tlsPskFile !== undefined ? { pskFile: u.tlsPskFile } : {}),
        ...(u.username !== undefined ? { username: u.username } : {}),
        ...(u.tlsVerifyPeer !== undefined ? { verifyPeer: u.tlsVerifyPeer } : {}),
        ...(u.tlsHostname !== undefined ? { hostname: u.tlsHostname } : {}),
      }
    : undefined;
  const addr: NbdAddress = u.transport === 'unix' ? { socket: u.socket!, exportName: u.exportName } : { host: u.host!, port: u.port!, exportName: u.exportName };
  return tls !== undefined ? { addr, tls } : { addr };
}

export function resolveTarget(input: NbdTargetInput, opts: NbdConnectOptions = {}): ResolvedTarget {
  let addr: NbdAddress;
  let tls: NbdTlsOptions | undefined;
  if (typeof input === 'string') {
    ({ addr, tls } = fromUri(parseNbdUri(input)));
  } else if ('transport' in input) {
    ({ addr, tls } = fromUri(input));
  } else {
    addr = input;
    tls = input.tls === true ? {} : undefined;
  }
  if (opts.tls !== undefined) tls = { ...tls, ...opts.tls };
  if (addr.socket === undefined && addr.host === undefined) throw new UsageError('an NBD target needs a unix socket path or a host');
  if (addr.socket !== undefined && addr.host !== undefined) throw new UsageError('an NBD target takes a unix socket path or a host, not both');
  const exportName = opts.exportName ?? addr.exportName ?? '';
  return {
    ...(addr.socket !== undefined ? { socket: addr.socket } : { host: addr.host! }),
    port: addr.port ?? NBD_DEFAULT_PORT,
    exportName,
    ...(tls !== undefined ? { tls } : {}),
    ...(opts.handshakeTimeoutMs !== undefined ? { handshakeTimeoutMs: opts.handshakeTimeoutMs } : {}),
  };
}

export function describeTarget(t: ResolvedTarget): string {
  return t.socket !== undefined ? `unix:${t.socket}` : `${t.host}:${t.port}`;
}
