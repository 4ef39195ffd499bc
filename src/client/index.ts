// Public surface of the NBD client library.

export { NbdClient, type BlockStatusReply, type ReadOptions, type WriteFlags, type ZeroFlags, type BlockStatusOptions } from './nbd-client.js';
export type { ExportInfo, ExportListEntry } from './handshake.js';
export type { NbdAddress, NbdConnectOptions, NbdTargetInput, NbdTlsOptions } from './target.js';
export { NbdConnectError, NbdOptionError, NbdTlsError } from './errors.js';
export { nbdDevice, openNbdDevice } from './nbd-device.js';
export { parsePskFile } from './tls.js';
