// TLS for NBD_OPT_STARTTLS (nbd-proto.md "TLS support"): credentials loaded the way qemu-nbd
// (`--object tls-creds-x509,dir=...`) and nbdkit (`--tls-certificates DIR`, `--tls-psk FILE`)
// load them, and the in-place upgrade of an accepted socket.
//
// X.509: DIR holds ca-cert.pem, server-cert.pem and server-key.pem; with `verifyPeer` the
// client must present a certificate signed by the CA. PSK: a file of `username:hexkey` lines
// (nbdkit's and GnuTLS psktool's format); the client's identity picks the key.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { createSecureContext, TLSSocket, type SecureContext } from 'node:tls';
import { UsageError } from '../errors.js';

export interface TlsCredentials {
  readonly kind: 'x509' | 'psk';
  readonly context: SecureContext;
  readonly verifyPeer: boolean;
  /** PSK identities and keys. */
  readonly psk?: ReadonlyMap<string, Buffer>;
}

/** NBD implementations "MUST support TLS version 1.2"; older versions are not offered. */
const MIN_VERSION = 'TLSv1.2';

/**
 * PSK cipher suites for TLS 1.2 (GnuTLS clients such as libnbd offer PSK, DHE-PSK and
 * ECDHE-PSK); TLS 1.3 suites carry PSK without naming it.
 */
const PSK_CIPHERS = [
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'ECDHE-PSK-CHACHA20-POLY1305',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'DHE-PSK-CHACHA20-POLY1305',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305',
].join(':');

function readCredentialFile(path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (e) {
    throw new UsageError(`cannot read TLS credentials file ${path}: ${(e as Error).message}`, { cause: e });
  }
}

export interface X509Files {
  readonly cert: string;
  readonly key: string;
  /** CA bundle that client certificates must chain to (needed with verifyPeer). */
  readonly ca?: string;
}

export function loadX509(files: X509Files, verifyPeer = false): TlsCredentials {
  if (verifyPeer && files.ca === undefined) throw new UsageError('verifying client certificates needs a CA certificate');
  const context = createSecureContext({
    cert: readCredentialFile(files.cert),
    key: readCredentialFile(files.key),
    ca: files.ca !== undefined ? readCredentialFile(files.ca) : undefined,
    minVersion: MIN_VERSION,
  });
  return { kind: 'x509', context, verifyPeer };
}

/** A directory laid out as qemu and nbdkit expect: ca-cert.pem, server-cert.pem, server-key.pem. */
export function loadX509Dir(dir: string, verifyPeer = false): TlsCredentials {
  const ca = join(dir, 'ca-cert.pem');
  let haveCa = true;
  try {
    readFileSync(ca);
  } catch {
    haveCa = false;
  }
  return loadX509({ cert: join(dir, 'server-cert.pem'), key: join(dir, 'server-key.pem'), ca: haveCa ? ca : undefined }, verifyPeer);
}

/** Parse `username:hexkey` lines; blank lines are skipped. */
export function parsePskFile(text: string, path = 'PSK file'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '') return;
    const colon = line.indexOf(':');
    const user = colon > 0 ? line.slice(0, colon) : '';
    const hex = colon > 0 ? line.slice(colon + 1) : '';
    if (user === '' || hex === '' || hex.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(hex)) {
      throw new UsageError(`${path} line ${i + 1}: expected username:hexkey`);
    }
    keys.set(user, Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw new UsageError(`${path} holds no keys`);
  return keys;
}

export function loadPsk(path: string): TlsCredentials {
  const psk = parsePskFile(readCredentialFile(path).toString('utf8'), path);
  const context = createSecureContext({ ciphers: PSK_CIPHERS, minVersion: MIN_VERSION });
  return { kind: 'psk', context, verifyPeer: false, psk };
}

/** Start the server side of TLS on `raw` (after NBD_REP_ACK to NBD_OPT_STARTTLS). */
export function upgradeToTls(raw: Duplex, creds: TlsCredentials): TLSSocket {
  const psk = creds.psk;
  return new TLSSocket(raw, {
    isServer: true,
    secureContext: creds.context,
    requestCert: creds.verifyPeer,
    rejectUnauthorized: creds.verifyPeer,
    ...(psk !== undefined ? { pskCallback: (_socket: TLSSocket, identity: string) => psk.get(identity) ?? null } : {}),
  } as ConstructorParameters<typeof TLSSocket>[1]);
}
