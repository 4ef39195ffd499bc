// NBD URIs (nbd-uri.md): nbd://, nbds://, nbd+unix://, nbds+unix:// parsed into a connection
// target and formatted back. RFC 3986 split by hand rather than through WHATWG URL, whose
// rules for non-special schemes differ from RFC 3986 in corner cases (empty authorities,
// percent-encoded paths) that decide the export name.

import { UsageError } from '../errors.js';

export const NBD_DEFAULT_PORT = 10809;

export type NbdTransport = 'tcp' | 'unix';
export type NbdTlsType = 'anon' | 'x509' | 'psk';

export interface NbdUri {
  /** nbds / nbds+unix: TLS is mandatory. */
  readonly tls: boolean;
  readonly transport: NbdTransport;
  /** TCP host name or address (IPv6 without brackets). */
  readonly host?: string;
  readonly port?: number;
  /** Unix socket path (a leading NUL means the abstract namespace). */
  readonly socket?: string;
  /** The path without its leading '/', percent-decoded; '' is the default export. */
  readonly exportName: string;
  /** userinfo, or tls-username: the PSK identity. */
  readonly username?: string;
  readonly tlsType?: NbdTlsType;
  readonly tlsHostname?: string;
  readonly tlsVerifyPeer?: boolean;
  /** Directory with ca-cert.pem, client-cert.pem, client-key.pem (libnbd, qemu and nbdkit layout). */
  readonly tlsCertificates?: string;
  /** PSK key file: lines of `username:hexkey`. */
  readonly tlsPskFile?: string;
}

const SCHEMES: Record<string, { tls: boolean; transport: NbdTransport }> = {
  nbd: { tls: false, transport: 'tcp' },
  nbds: { tls: true, transport: 'tcp' },
  'nbd+unix': { tls: false, transport: 'unix' },
  'nbds+unix': { tls: true, transport: 'unix' },
};

// RFC 3986 appendix B, with the fragment kept so it can be refused.
const URI_RE = /^([A-Za-z][A-Za-z0-9+.-]*):(?:\/\/([^/?#]*))?([^?#]*)(?:\?([^#]*))?(#.*)?$/;

function fail(uri: string, why: string): never {
  throw new UsageError(`invalid NBD URI ${JSON.stringify(uri)}: ${why}`);
}

function decode(uri: string, s: string, what: string): string {
  // Validate every escape first: decodeURIComponent's own error does not say where.
  if (/%(?![0-9A-Fa-f]{2})/.test(s)) fail(uri, `bad percent-encoding in ${what}`);
  try {
    return decodeURIComponent(s);
  } catch {
    fail(uri, `${what} is not valid UTF-8 once percent-decoded`);
  }
}

function parseBool(uri: string, key: string, value: string): boolean {
  if (value === '1' || value === 'true' || value === 'yes' || value === 'on') return true;
  if (value === '0' || value === 'false' || value === 'no' || value === 'off') return false;
  fail(uri, `${key} must be 0 or 1, not ${JSON.stringify(value)}`);
}

type Mutable = { -readonly [K in keyof NbdUri]: NbdUri[K] };

function parseAuthority(uri: string, authority: string, out: Mutable): void {
  let hostPort = authority;
  const at = authority.lastIndexOf('@');
  if (at >= 0) {
    const userinfo = authority.slice(0, at);
    hostPort = authority.slice(at + 1);
    // A password in the URI would be a secret in shell history and process listings.
    if (userinfo.includes(':')) fail(uri, 'passwords in the URI are not supported (use tls-psk-file)');
    if (userinfo !== '') out.username = decode(uri, userinfo, 'user name');
  }
  let host: string;
  let portText: string | undefined;
  if (hostPort.startsWith('[')) {
    const close = hostPort.indexOf(']');
    if (close < 0) fail(uri, 'unterminated IPv6 literal');
    host = hostPort.slice(1, close);
    if (!/^[0-9A-Fa-f:.]+(%25[A-Za-z0-9._~-]+)?$/.test(host) || !host.includes(':')) fail(uri, `bad IPv6 literal [${host}]`);
    host = decode(uri, host, 'IPv6 zone');
    const rest = hostPort.slice(close + 1);
    if (rest !== '') {
      if (!rest.startsWith(':')) fail(uri, `unexpected ${JSON.stringify(rest)} after IPv6 literal`);
      portText = rest.slice(1);
    }
  } else {
    const colon = hostPort.lastIndexOf(':');
    if (colon >= 0) {
      portText = hostPort.slice(colon + 1);
      hostPort = hostPort.slice(0, colon);
    }
    if (hostPort.includes(':')) fail(uri, 'IPv6 addresses must be in brackets, e.g. nbd://[::1]/');
    host = decode(uri, hostPort, 'host');
  }
  if (host !== '') out.host = host;
  if (portText !== undefined && portText !== '') {
    if (!/^[0-9]{1,5}$/.test(portText)) fail(uri, `bad port ${JSON.stringify(portText)}`);
    const port = Number(portText);
    if (port < 1 || port > 65535) fail(uri, `port ${port} is out of range`);
    out.port = port;
  }
}

/** Parse an NBD URI; throws UsageError saying what is wrong. */
export function parseNbdUri(uri: string): NbdUri {
  const m = URI_RE.exec(uri);
  if (!m) fail(uri, 'not a URI');
  const scheme = m[1]!.toLowerCase();
  const kind = SCHEMES[scheme];
  if (!kind) fail(uri, `unknown scheme ${JSON.stringify(scheme)} (expected nbd, nbds, nbd+unix or nbds+unix)`);
  if (m[5] !== undefined) fail(uri, 'fragments (#...) are not allowed');
  const out: Mutable = { tls: kind.tls, transport: kind.transport, exportName: '' };
  const authority = m[2];
  const path = m[3]!;

  if (authority !== undefined && authority !== '') {
    if (kind.transport === 'unix') fail(uri, `${scheme} takes no host: use ${scheme}:///export?socket=PATH`);
    parseAuthority(uri, authority, out);
  }
  if (path !== '') {
    if (!path.startsWith('/')) fail(uri, 'the export name must follow a "/"');
    out.exportName = decode(uri, path.slice(1), 'export name');
    if (out.exportName.includes('\0')) fail(uri, 'export names cannot contain NUL');
  }

  const seen = new Set<string>();
  for (const pair of (m[4] ?? '').split('&')) {
    if (pair === '') continue;
    const eq = pair.indexOf('=');
    const key = decode(uri, eq < 0 ? pair : pair.slice(0, eq), 'query parameter name');
    const value = decode(uri, eq < 0 ? '' : pair.slice(eq + 1), `query parameter ${key}`);
    if (seen.has(key)) fail(uri, `query parameter ${key} appears twice`);
    seen.add(key);
    switch (key) {
      case 'socket':
        if (kind.transport !== 'unix') fail(uri, `socket= is only for nbd+unix and nbds+unix`);
        if (value === '') fail(uri, 'socket= is empty');
        out.socket = value;
        break;
      case 'tls-type':
        if (value !== 'anon' && value !== 'x509' && value !== 'psk') fail(uri, `tls-type must be anon, x509 or psk`);
        out.tlsType = value;
        break;
      case 'tls-hostname':
        out.tlsHostname = value;
        break;
      case 'tls-verify-peer':
        out.tlsVerifyPeer = parseBool(uri, key, value);
        break;
      case 'tls-certificates':
        out.tlsCertificates = value;
        break;
      case 'tls-psk-file':
        out.tlsPskFile = value;
        break;
      case 'tls-username':
        if (out.username !== undefined && out.username !== value) fail(uri, 'tls-username conflicts with the user name in the authority');
        out.username = value;
        break;
      default:
        // "Any other query parameters which the client does not understand SHOULD be diagnosed."
        if (!key.startsWith('x-')) fail(uri, `unknown query parameter ${JSON.stringify(key)}`);
    }
  }

  if (kind.transport === 'unix') {
    if (out.socket === undefined) fail(uri, `${scheme} requires ?socket=PATH`);
  } else {
    out.host ??= 'localhost';
    out.port ??= NBD_DEFAULT_PORT;
  }
  if (out.tlsCertificates !== undefined && out.tlsPskFile !== undefined) {
    fail(uri, 'tls-certificates and tls-psk-file are mutually exclusive');
  }
  return out;
}

// Unreserved characters plus those RFC 3986 allows unescaped in a path segment or query value.
function encodePart(s: string, keep: RegExp): string {
  let out = '';
  for (const ch of s) out += keep.test(ch) ? ch : Buffer.from(ch, 'utf8').reduce((a, b) => a + '%' + b.toString(16).toUpperCase().padStart(2, '0'), '');
  return out;
}
const PATH_SAFE = /^[A-Za-z0-9\-._~!$'()*,;:@/]$/;
const QUERY_SAFE = /^[A-Za-z0-9\-._~!$'()*,;:@/?]$/;

/** Format a target as a canonical NBD URI that parseNbdUri reads back to the same fields. */
export function formatNbdUri(uri: NbdUri): string {
  const scheme = (uri.tls ? 'nbds' : 'nbd') + (uri.transport === 'unix' ? '+unix' : '');
  let authority = '';
  const query: [string, string][] = [];
  if (uri.transport === 'tcp') {
    const host = uri.host ?? 'localhost';
    const hostText = host.includes(':') ? `[${host.replace(/%/g, '%25')}]` : encodePart(host, PATH_SAFE);
    const user = uri.username !== undefined ? encodePart(uri.username, /^[A-Za-z0-9\-._~!$'()*,;]$/) + '@' : '';
    authority = user + hostText + (uri.port !== undefined && uri.port !== NBD_DEFAULT_PORT ? `:${uri.port}` : '');
  } else {
    if (uri.socket === undefined) throw new UsageError('a unix NBD target needs a socket path');
    query.push(['socket', uri.socket]);
    if (uri.username !== undefined) query.push(['tls-username', uri.username]);
  }
  if (uri.tlsType !== undefined) query.push(['tls-type', uri.tlsType]);
  if (uri.tlsHostname !== undefined) query.push(['tls-hostname', uri.tlsHostname]);
  if (uri.tlsVerifyPeer !== undefined) query.push(['tls-verify-peer', uri.tlsVerifyPeer ? '1' : '0']);
  if (uri.tlsCertificates !== undefined) query.push(['tls-certificates', uri.tlsCertificates]);
  if (uri.tlsPskFile !== undefined) query.push(['tls-psk-file', uri.tlsPskFile]);
  const q = query.map(([k, v]) => `${k}=${encodePart(v, QUERY_SAFE)}`).join('&');
  return `${scheme}://${authority}/${encodePart(uri.exportName, PATH_SAFE)}${q === '' ? '' : `?${q}`}`;
}
