// imgbd detach DEVICE|MOUNTPOINT|IMAGE [--force]: stop the device's supervisor (or, when it
// is gone, do its teardown) and wait until the kernel has released the device.

import type { Command } from 'commander';
import { detachDevice, resolveDetachTarget } from '../../kernel/attach-detach.js';
import { runDir } from '../../kernel/state.js';

export async function run(args: string[], opts: Record<string, unknown>, _cmd: Command): Promise<number> {
  const dir = runDir();
  const state = resolveDetachTarget(args[0] ?? '', dir);
  const r = await detachDevice(state, { force: opts.force === true, runDir: dir });
  if (r.stillHeld) process.stderr.write(`imgbd: ${r.device} is disconnected but still held; it is released when its users let go\n`);
  process.stdout.write(`${r.device}\n`);
  return 0;
}
