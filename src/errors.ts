// The error hierarchy every layer throws. Callers match on `code`, never on message text;
// docs/errors.md lists every code. Libraries throw, only the CLI prints and exits.

/** errno values that NBD can carry on the wire (nbd-proto.md, "Error values"). */
export type NbdErrno =
  | 'EPERM'
  | 'EIO'
  | 'ENOMEM'
  | 'EINVAL'
  | 'ENOSPC'
  | 'EOVERFLOW'
  | 'ENOTSUP'
  | 'ESHUTDOWN';

export class ImgbdError extends Error {
  readonly code: string;

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** The peer broke the protocol or the transport died: the connection is unusable. */
export class ProtocolError extends ImgbdError {}

/** One request failed; the connection stays usable. `errno` is what goes on the wire. */
export class RequestError extends ImgbdError {
  readonly errno: NbdErrno;

  constructor(errno: NbdErrno, message: string, options?: { cause?: unknown }) {
    super(`ERR_REQUEST_${errno}`, message, options);
    this.errno = errno;
  }
}

/** The image's metadata is inconsistent or hostile. */
export class CorruptImageError extends ImgbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_CORRUPT_IMAGE', message, options);
  }
}

/** The image uses a feature this build cannot handle safely. */
export class UnsupportedImageError extends ImgbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_UNSUPPORTED_IMAGE', message, options);
  }
}

/** Wrong command-line arguments or options. */
export class UsageError extends ImgbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_USAGE', message, options);
  }
}

/** Map any thrown value to the errno a request reply should carry. */
export function toNbdErrno(err: unknown): NbdErrno {
  if (err instanceof RequestError) return err.errno;
  const code = (err as { code?: unknown } | null)?.code;
  switch (code) {
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return 'EPERM';
    case 'ENOMEM':
      return 'ENOMEM';
    case 'EINVAL':
      return 'EINVAL';
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return 'ENOSPC';
    case 'EOVERFLOW':
      return 'EOVERFLOW';
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
      return 'ENOTSUP';
    case 'ESHUTDOWN':
      return 'ESHUTDOWN';
    default:
      return 'EIO';
  }
}
