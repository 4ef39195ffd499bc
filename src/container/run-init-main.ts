// Entry point of the `imgbd run` container init (spawned by run.ts as the first process of a
// new pid namespace): fd 3 is the channel to the run command. On success this process
// becomes CMD through execve and never returns here; on failure it reports on fd 3 and ends
// with the status a shell would give (127, 126) or 1.

import { writeSync } from 'node:fs';
import { CommandStartError, runInit } from './run-init.js';
import { encodeFailure } from './run-protocol.js';

const CHANNEL_FD = 3;

try {
  runInit(CHANNEL_FD);
} catch (e) {
  const err = e as { code?: unknown; message?: string };
  const exitStatus = e instanceof CommandStartError ? e.exitStatus : undefined;
  try {
    writeSync(
      CHANNEL_FD,
      encodeFailure({
        code: typeof err.code === 'string' ? err.code : 'ERR_RUN_INIT',
        message: err.message ?? String(e),
        ...(exitStatus !== undefined && { exitStatus }),
      }),
    );
  } catch {
    // The run command is gone; its death already tore everything down.
  }
  process.exitCode = exitStatus ?? 1;
}
