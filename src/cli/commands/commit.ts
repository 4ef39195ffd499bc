// imgbd commit: qemu-img commit's spelling (-f, -b, -d, -p, -q). The work is in src/image/commit.ts.

import { progressBar } from '../lib/progress.js';
import { commitImage } from '../../image/commit.js';

interface CommitCliOptions {
  format?: string;
  base?: string;
  keep?: boolean;
  allowBacking?: string[];
  progress?: boolean;
  quiet?: boolean;
}

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const c = opts as CommitCliOptions;
  const bar = await progressBar('committing', c.progress === true && !c.quiet);
  bar?.start(100, 0);
  await commitImage({
    overlay: args[0]!,
    format: c.format,
    base: c.base,
    keep: c.keep,
    ...(c.allowBacking ? { allowBacking: c.allowBacking } : {}),
    onProgress: (d, t) => bar?.update(t === 0 ? 100 : Math.floor((d * 100) / t)),
  });
  bar?.update(100);
  bar?.stop();
  if (!c.quiet) process.stdout.write('Image committed.\n');
  return 0;
}
