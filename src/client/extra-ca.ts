// Certificates a user added to Node's default trust store with NODE_EXTRA_CA_CERTS. The imgbd
// command (bin/imgbd) passes that variable on as IMGBD_EXTRA_CA_CERTS so that node does not read
// the file at every start; a TLS connection that would use the default store reads it here.

import { readFileSync } from 'node:fs';
import { rootCertificates } from 'node:tls';

/** The default store plus the extra certificates, or undefined: Node's default store as it is. */
export function defaultTrustStore(env: NodeJS.ProcessEnv = process.env): (string | Buffer)[] | undefined {
  const file = env.IMGBD_EXTRA_CA_CERTS;
  if (!file) return undefined;
  try {
    return [...rootCertificates, readFileSync(file)];
  } catch (e) {
    // What node does with an unreadable NODE_EXTRA_CA_CERTS: warn, and trust the default store.
    process.emitWarning(`ignoring extra CA certificates from ${file}: ${(e as Error).message}`);
    return undefined;
  }
}
