// imgbd gc: reclaim devices whose supervisor died (disconnect, unmount what it mounted,
// remove the state). Prints each device reclaimed; exits 1 when one could not be.

import type { Command } from 'commander';
import { collectGarbage } from '../../kernel/attach-detach.js';
import { runDir } from '../../kernel/state.js';

export async function run(_args: string[], _opts: Record<string, unknown>, _cmd: Command): Promise<number> {
  const r = await collectGarbage({ runDir: runDir() });
  for (const d of r.reclaimed) process.stdout.write(`${d}\n`);
  for (const f of r.failed) process.stderr.write(`imgbd: ${f.device}: ${f.error.message}\n`);
  return r.failed.length > 0 ? 1 : 0;
}
