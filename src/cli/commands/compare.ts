// imgbd compare: qemu-img compare's messages and exit codes (qemu-img.rst, "compare"):
// 0 identical, 1 different, 2 an error (opening or reading either image).

import { progressBar } from '../lib/progress.js';
import { compareDevices } from '../../image/compare.js';
import { openTarget, type OpenedTarget } from '../../image/open.js';

interface CompareCliOptions {
  format?: string;
  formatB?: string;
  strict?: boolean;
  progress?: boolean;
  quiet?: boolean;
  json?: boolean;
}

export const COMPARE_EXIT = { IDENTICAL: 0, DIFFERENT: 1, ERROR: 2 } as const;

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const c = opts as CompareCliOptions;
  const [nameA, nameB] = args as [string, string];
  const say = (line: string): void => {
    if (!c.quiet && !c.json) process.stdout.write(`${line}\n`);
  };
  let a: OpenedTarget | undefined;
  let b: OpenedTarget | undefined;
  try {
    a = await openTarget(nameA, { format: c.format, readOnly: true });
    b = await openTarget(nameB, { format: c.formatB, readOnly: true });
    const bar = await progressBar('comparing', c.progress === true && !c.quiet);
    bar?.start(100, 0);
    const r = await compareDevices(a.device, b.device, { strict: c.strict, onProgress: (d, t) => bar?.update(t === 0 ? 100 : Math.floor((d * 100) / t)) });
    bar?.stop();
    if (r.sizeMismatch && !c.strict) say('Warning: Image size mismatch!');
    if (c.json) {
      const out: Record<string, unknown> = { identical: r.identical, 'size-mismatch': r.sizeMismatch };
      if (!r.identical) out.reason = r.reason;
      if (!r.identical && r.reason !== 'size') out.offset = r.offset;
      process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
    }
    if (r.identical) {
      say('Images are identical.');
      return COMPARE_EXIT.IDENTICAL;
    }
    if (r.reason === 'size') say('Strict mode: Image size mismatch!');
    else if (r.reason === 'status') say(`Strict mode: Offset ${r.offset} block status mismatch!`);
    else say(`Content mismatch at offset ${r.offset}!`);
    return COMPARE_EXIT.DIFFERENT;
  } catch (err) {
    if (!c.quiet) process.stderr.write(`imgbd: ${err instanceof Error ? err.message : String(err)}\n`);
    return COMPARE_EXIT.ERROR;
  } finally {
    await a?.device.close();
    await b?.device.close();
  }
}
