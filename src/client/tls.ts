// TLS credentials for NBD_OPT_STARTTLS (nbd-proto.md "TLS support"), in the layouts nbdkit,
// qemu-nbd and libnbd share: a certificates directory (ca-cert.pem, client-cert.pem,
// client-key.pem) or a PSK file of `username:hexkey` lines. GnuTLS servers accept PSK over
// both TLS 1.2 (PSK-* suites) and TLS 1.3; OpenSSL needs the PSK suites named explicitly,
// and its TLS 1.3 suites stay enabled alongside them.

import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { userInfo } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import { defaultTrustStore } from './extra-ca.js';
import { NbdTlsError } from './errors.js';
import type { NbdTlsOptions } from './target.js';

export interface PskEntry {
  readonly identity: string;
  readonly key: Buffer;
}

/** Parse a PSK key file; malformed lines are errors rather than silently skipped keys. */
export function parsePskFile(text: string, path = 'PSK file'): PskEntry[] {
  const out: PskEntry[] = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '') return;
    const colon = line.lastIndexOf(':');
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1).trim();
    if (colon <= 0 || !/^(?:[0-9A-Fa-f]{2})+$/.test(hex)) {
      throw new NbdTlsError(`${path} line ${i + 1} is not username:hexkey`);
    }
    out.push({ identity, key: Buffer.from(hex, 'hex') });
  });
  return out;
}

async function readCredential(path: string, what: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (err) {
    throw new NbdTlsError(`cannot read TLS ${what} ${path}: ${(err as Error).message}`, { cause: err });
  }
}

async function readOptional(path: string): Promise<Buffer | undefined> {
  try {
    return await readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new NbdTlsError(`cannot read ${path}: ${(err as Error).message}`, { cause: err });
  }
}

/** Connection options for tls.connect over an existing socket. */
/** No CA given: Node's default store, with the certificates NODE_EXTRA_CA_CERTS named (bin/imgbd). */
function withExtraCa(): { ca?: (string | Buffer)[] } {
  const ca = defaultTrustStore();
  return ca === undefined ? {} : { ca };
}

export async function buildTlsOptions(opts: NbdTlsOptions, tcpHost: string | undefined): Promise<tls.ConnectionOptions> {
  const verifyPeer = opts.verifyPeer ?? true;
  const hostname = opts.hostname ?? tcpHost;
  const base: tls.ConnectionOptions = {
    minVersion: 'TLSv1.2',
    ...(hostname !== undefined && isIP(hostname) === 0 ? { servername: hostname } : {}),
  };

  if (opts.pskFile !== undefined) {
    const entries = parsePskFile((await readCredential(opts.pskFile, 'PSK file')).toString('utf8'), opts.pskFile);
    const identity = opts.username ?? userInfo().username;
    const entry = entries.find((e) => e.identity === identity);
    if (!entry) throw new NbdTlsError(`PSK file ${opts.pskFile} has no key for user ${JSON.stringify(identity)}`);
    return {
      ...base,
      ciphers: 'PSK',
      pskCallback: () => ({ psk: entry.key, identity: entry.identity }),
      // The PSK authenticates the server; there is no certificate to check.
      checkServerIdentity: () => undefined,
    };
  }

  const dir = opts.certificatesDir;
  const ca = opts.caFile !== undefined ? await readCredential(opts.caFile, 'CA file') : dir !== undefined ? await readOptional(join(dir, 'ca-cert.pem')) : undefined;
  const cert = opts.certFile !== undefined ? await readCredential(opts.certFile, 'certificate') : dir !== undefined ? await readOptional(join(dir, 'client-cert.pem')) : undefined;
  const key = opts.keyFile !== undefined ? await readCredential(opts.keyFile, 'key') : dir !== undefined ? await readOptional(join(dir, 'client-key.pem')) : undefined;
  if ((cert === undefined) !== (key === undefined)) throw new NbdTlsError('a client certificate needs its key, and a key its certificate');
  return {
    ...base,
    ...(ca !== undefined ? { ca } : withExtraCa()),
    ...(cert !== undefined ? { cert, key } : {}),
    rejectUnauthorized: verifyPeer,
    checkServerIdentity: (_host, peer) => {
      // Over a unix socket there is no host name to check unless tls-hostname gave one;
      // the chain is still verified against the CA.
      if (!verifyPeer || hostname === undefined) return undefined;
      return tls.checkServerIdentity(hostname, peer);
    },
  };
}
