// The one place that turns errors into messages and exit codes. Documented in docs/cli.md.

import { CommanderError } from 'commander';
import { CorruptImageError, ImgbdError, ProtocolError, RequestError, UnsupportedImageError, UsageError } from '../errors.js';

export const EXIT = {
  OK: 0,
  /** The command ran and failed (I/O error, peer refused, image problem). */
  FAILURE: 1,
  /** Wrong arguments: nothing was done. (sysexits EX_USAGE) */
  USAGE: 64,
} as const;

/** Something the command decided to exit with (e.g. `check`'s 2 and 3), without an error message. */
export class ExitCode extends Error {
  constructor(readonly exitCode: number) {
    super(`exit ${exitCode}`);
  }
}

function hint(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  switch (code) {
    case 'ENOENT':
      return 'check the path';
    case 'EACCES':
    case 'EPERM':
      return 'check permissions, or run as root';
    case 'EADDRINUSE':
      return 'another server listens there: pick another --port or --socket';
    case 'ECONNREFUSED':
      return 'is the server running, and is this its address?';
    default:
      break;
  }
  if (err instanceof UsageError) return "see 'imgbd <command> --help'";
  if (err instanceof CorruptImageError) return "run 'imgbd check' on the image";
  return undefined;
}

export function reportError(err: unknown, stderr: NodeJS.WritableStream = process.stderr): number {
  if (err instanceof ExitCode) return err.exitCode;
  if (err instanceof CommanderError) return err.exitCode === 0 ? EXIT.OK : EXIT.USAGE;
  const message = err instanceof Error ? err.message : String(err);
  const h = hint(err);
  stderr.write(`imgbd: ${message}${h ? ` (${h})` : ''}\n`);
  if (process.env.IMGBD_DEBUG && err instanceof Error && err.stack) stderr.write(`${err.stack}\n`);
  if (err instanceof UsageError) return EXIT.USAGE;
  if (err instanceof ImgbdError || err instanceof ProtocolError || err instanceof RequestError || err instanceof UnsupportedImageError) {
    return EXIT.FAILURE;
  }
  return EXIT.FAILURE;
}
