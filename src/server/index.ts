// The server's public surface, for the CLI and the kernel attach.

export { NbdServer, type NbdServerOptions, type ServeTransmissionOptions } from './server.js';
export { listenInherited, listenTcp, listenUnix, NBD_DEFAULT_PORT, type Listener, type TcpOptions } from './listen.js';
export { loadPsk, loadX509, loadX509Dir, parsePskFile, type TlsCredentials, type X509Files } from './tls.js';
export { DEFAULT_CONNECTION_LIMITS, type ConnectionLimits } from './connection.js';
export type { ExportConfig } from './exports.js';
export type { TlsMode } from './negotiation.js';
export { SILENT_LOGGER, type Logger } from './logger.js';
