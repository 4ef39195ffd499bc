// imgbd rebase: qemu-img rebase's spelling (-b, -F, -f, -u, -p, -q). The work is in src/image/rebase.ts.

import { progressBar } from '../lib/progress.js';
import { rebaseImage } from '../../image/rebase.js';

interface RebaseCliOptions {
  backing: string;
  backingFormat?: string;
  format?: string;
  unsafe?: boolean;
  allowBacking?: string[];
  progress?: boolean;
  quiet?: boolean;
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const c = opts as unknown as RebaseCliOptions;
  const bar = await progressBar('rebasing', c.progress === true && !c.quiet);
  bar?.start(100, 0);
  const r = await rebaseImage({
    overlay: args[0]!,
    format: c.format,
    backing: c.backing,
    backingFormat: c.backingFormat,
    unsafe: c.unsafe,
    ...(c.allowBacking ? { allowBacking: c.allowBacking } : {}),
    onProgress: (d, t) => bar?.update(t === 0 ? 100 : Math.floor((d * 100) / t)),
  });
  bar?.update(100);
  bar?.stop();
  if (!c.quiet && !c.unsafe && r.copiedBytes > 0) process.stdout.write(`${r.copiedBytes} bytes copied into ${args[0]!}.\n`);
  return 0;
}
