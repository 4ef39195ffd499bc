// Guest-side half of the result protocol in ../checks.ts, for node scripts run in the VM.

import { appendFileSync } from 'node:fs';

export function reportCheck(suite: string, check: string, ok: boolean, detail?: unknown): void {
  const line = JSON.stringify({ suite, check, ok, ...(detail !== undefined && { detail }) });
  const path = process.env.IMGBD_VM_RESULTS;
  if (path) appendFileSync(path, `${line}\n`);
  else process.stdout.write(`${line}\n`);
}

export function errorDetail(err: unknown): unknown {
  const e = err as { name?: string; code?: string; errno?: number; message?: string };
  return { name: e.name, code: e.code, errno: e.errno, message: e.message };
}

/** Run one check: ok with whatever `fn` returns, failed with the error; never throws. */
export async function runCheck<T>(suite: string, check: string, fn: () => Promise<T> | T): Promise<T | undefined> {
  try {
    const detail = await fn();
    reportCheck(suite, check, true, detail);
    return detail;
  } catch (err) {
    reportCheck(suite, check, false, errorDetail(err));
    return undefined;
  }
}
