// Errors specific to the client side of the handshake. Transmission failures use the shared
// ProtocolError (connection dead) and RequestError (one request failed) from src/errors.ts.

import { ImgbdError } from '../errors.js';
import { NBD_OPT, NBD_REP } from '../protocol/constants.js';

const REP_NAMES = new Map<number, string>(Object.entries(NBD_REP).map(([k, v]) => [v, k]));
const OPT_NAMES = new Map<number, string>(Object.entries(NBD_OPT).map(([k, v]) => [v, k]));

export function optionName(option: number): string {
  return `NBD_OPT_${OPT_NAMES.get(option) ?? option}`;
}

export function replyTypeName(type: number): string {
  const name = REP_NAMES.get(type);
  return name !== undefined ? `NBD_REP_${name}` : `reply type 0x${type.toString(16)}`;
}

/**
 * The server refused an option. `code` is ERR_NBD_REP_<NAME> after the reply type
 * (ERR_NBD_REP_ERR_UNKNOWN: no such export; ERR_NBD_REP_ERR_TLS_REQD: TLS needed; ...).
 */
export class NbdOptionError extends ImgbdError {
  readonly option: number;
  readonly replyType: number;

  constructor(option: number, replyType: number, serverMessage: string) {
    const name = REP_NAMES.get(replyType) ?? `0x${replyType.toString(16)}`;
    const detail = serverMessage !== '' ? `: ${serverMessage}` : '';
    super(`ERR_NBD_REP_${name}`, `server refused ${optionName(option)} with ${replyTypeName(replyType)}${detail}`);
    this.option = option;
    this.replyType = replyType;
  }
}

/** TLS could not be negotiated, or its credentials are unusable. */
export class NbdTlsError extends ImgbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_NBD_TLS', message, options);
  }
}

/** The socket could not be opened (refused, no such socket, DNS). */
export class NbdConnectError extends ImgbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_NBD_CONNECT', message, options);
  }
}
