// Protocol-level request checks, done before a request reaches the export's Backend (which
// checks range, alignment and writability): the command is known and advertised, every flag
// is documented for it and negotiated, and payload lengths respect what was advertised.
// After nbdkit's protocol.c validate_request; nbd-proto.md "Error values":
//   "The server SHOULD return NBD_EINVAL if it receives an unknown command."
//   "The server SHOULD return NBD_EINVAL if it receives an unknown command flag. It also
//    SHOULD return NBD_EINVAL if it receives a request with a flag not explicitly documented
//    as applicable to the given request."

import type { NbdErrno } from '../errors.js';
import {
  NBD_CMD,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from '../protocol/constants.js';

export interface ValidationContext {
  /** Transmission flags advertised on this connection. */
  readonly flags: number;
  /** Advertised maximum payload. */
  readonly maxPayloadBytes: number;
  /** Number of metadata contexts negotiated for this export. */
  readonly metaContexts: number;
}

export interface Invalid {
  readonly errno: NbdErrno;
  readonly message: string;
}

/** Flags documented per command, before negotiation is taken into account. */
const ALLOWED_FLAGS: Record<number, number> = {
  [NBD_CMD.READ]: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
  [NBD_CMD.WRITE]: NBD_CMD_FLAG_FUA,
  [NBD_CMD.DISC]: NBD_CMD_FLAG_FUA,
  [NBD_CMD.FLUSH]: NBD_CMD_FLAG_FUA,
  [NBD_CMD.TRIM]: NBD_CMD_FLAG_FUA,
  [NBD_CMD.CACHE]: NBD_CMD_FLAG_FUA,
  [NBD_CMD.WRITE_ZEROES]: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
  [NBD_CMD.BLOCK_STATUS]: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
};

/** The transmission flag that must have been advertised for each command. */
const REQUIRED_FLAG: Record<number, number> = {
  [NBD_CMD.FLUSH]: NBD_FLAG_SEND_FLUSH,
  [NBD_CMD.TRIM]: NBD_FLAG_SEND_TRIM,
  [NBD_CMD.WRITE_ZEROES]: NBD_FLAG_SEND_WRITE_ZEROES,
  [NBD_CMD.CACHE]: NBD_FLAG_SEND_CACHE,
};

const NAMES: Record<number, string> = {
  [NBD_CMD.READ]: 'read',
  [NBD_CMD.WRITE]: 'write',
  [NBD_CMD.DISC]: 'disconnect',
  [NBD_CMD.FLUSH]: 'flush',
  [NBD_CMD.TRIM]: 'trim',
  [NBD_CMD.CACHE]: 'cache',
  [NBD_CMD.WRITE_ZEROES]: 'write-zeroes',
  [NBD_CMD.BLOCK_STATUS]: 'block-status',
};

export function commandName(type: number): string {
  return NAMES[type] ?? `command ${type}`;
}

function invalid(errno: NbdErrno, message: string): Invalid {
  return { errno, message };
}

/** null when the request may go to the Backend; otherwise the error to reply with. */
export function validateRequest(type: number, flags: number, offset: number, length: number, ctx: ValidationContext): Invalid | null {
  const allowed = ALLOWED_FLAGS[type];
  if (allowed === undefined) return invalid('EINVAL', `unknown command ${type}`);
  const name = NAMES[type]!;
  if ((flags & ~allowed) !== 0) return invalid('EINVAL', `${name}: flags 0x${flags.toString(16)} are not valid for this command`);
  if ((flags & NBD_CMD_FLAG_FUA) !== 0 && (ctx.flags & NBD_FLAG_SEND_FUA) === 0) return invalid('EINVAL', `${name}: FUA was not negotiated`);
  // "Clients MUST NOT set the NBD_CMD_FLAG_DF request flag unless this transmission flag is set."
  if ((flags & NBD_CMD_FLAG_DF) !== 0 && (ctx.flags & NBD_FLAG_SEND_DF) === 0) return invalid('EINVAL', `${name}: DF needs structured replies`);
  if ((flags & NBD_CMD_FLAG_FAST_ZERO) !== 0 && (ctx.flags & NBD_FLAG_SEND_FAST_ZERO) === 0) {
    return invalid('EINVAL', `${name}: FAST_ZERO was not negotiated`);
  }
  const required = REQUIRED_FLAG[type];
  if (required !== undefined && (ctx.flags & required) === 0) return invalid('EINVAL', `${name} is not supported by this export`);
  switch (type) {
    case NBD_CMD.READ:
    case NBD_CMD.WRITE:
      // "the client MUST NOT request a length larger than the maximum payload size"
      if (length > ctx.maxPayloadBytes) return invalid('EINVAL', `${name} of ${length} bytes exceeds the maximum payload ${ctx.maxPayloadBytes}`);
      break;
    case NBD_CMD.FLUSH:
      // "For a flush request, length and offset are reserved, and MUST be set to all-zero."
      if (offset !== 0 || length !== 0) return invalid('EINVAL', 'flush with nonzero offset or length');
      break;
    case NBD_CMD.BLOCK_STATUS:
      // "A client MUST NOT send NBD_CMD_BLOCK_STATUS unless ... the server returned at least
      // one metadata context"
      if (ctx.metaContexts === 0) return invalid('EINVAL', 'block-status without a negotiated metadata context');
      break;
  }
  return null;
}
