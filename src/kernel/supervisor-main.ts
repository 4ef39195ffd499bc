// Entry point of the attach supervisor process (spawned detached by attach.ts, in its own
// session): argv[2] is the SupervisorConfig as JSON, fd 3 the readiness pipe, stderr the log.
// It stays alive serving the device until told to stop, and ends by letting the event loop
// drain (exit status in process.exitCode).

import { closeSync, writeSync } from 'node:fs';
import type { Logger } from '../server/logger.js';
import { Supervisor } from './supervisor.js';
import { encodeReadiness, type ReadinessMessage, type SupervisorConfig } from './supervisor-protocol.js';

const READINESS_FD = 3;

function line(level: string, message: string): void {
  process.stderr.write(`${new Date().toISOString()} [${process.pid}] ${level}: ${message}\n`);
}

const logger: Logger = {
  info: (m) => line('info', m),
  warn: (m) => line('warn', m),
  error: (m) => line('error', m),
};

function tell(msg: ReadinessMessage): void {
  try {
    writeSync(READINESS_FD, encodeReadiness(msg));
    closeSync(READINESS_FD);
  } catch (e) {
    // The attach command is gone (killed): the device stays, reachable through detach/gc.
    logger.warn(`readiness pipe: ${(e as Error).message}`);
  }
}

async function main(): Promise<void> {
  const cfg = JSON.parse(process.argv[2] ?? '') as SupervisorConfig;
  logger.info(`supervisor for ${cfg.image} starting`);
  const sup = new Supervisor(cfg, logger);
  const onSignal = (sig: NodeJS.Signals) => void sup.stop(`signal ${sig}`);
  for (const sig of ['SIGTERM', 'SIGHUP', 'SIGINT'] as const) process.on(sig, onSignal);
  // The attach command may be gone already; a closed readiness pipe must not kill us.
  try {
    const info = await sup.start();
    logger.info(`ready: ${info.device}${info.mountpoint ? ` mounted on ${info.mountpoint}` : ''}`);
    tell({ type: 'ready', info });
  } catch (e) {
    const err = e as { code?: unknown; message?: string };
    logger.error(`attach failed: ${err.message ?? String(e)}`);
    tell({ type: 'error', code: typeof err.code === 'string' ? err.code : 'ERR_SUPERVISOR', message: err.message ?? String(e) });
    process.exitCode = 1;
  }
  const reason = await sup.stopped;
  logger.info(`exiting: ${reason}`);
  for (const sig of ['SIGTERM', 'SIGHUP', 'SIGINT'] as const) process.off(sig, onSignal);
}

void main();
