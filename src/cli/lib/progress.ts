// Progress bars for long commands (cli-progress, on stderr), loaded only when one is drawn: most
// runs (scripts, pipes, -q) never show one and should not pay for loading it at startup.

import type { SingleBar } from 'cli-progress';

/**
 * A bar labelled `verb` ("converting"), or undefined when `show` is false. `inMiB`: the bar counts
 * MiB and shows value/total and an ETA; otherwise it counts percent.
 */
export async function progressBar(verb: string, show: boolean, inMiB = false): Promise<SingleBar | undefined> {
  if (!show) return undefined;
  const { SingleBar: Bar } = await import('cli-progress');
  const format = inMiB ? `${verb} [{bar}] {percentage}% | {value}/{total} MiB | ETA {eta}s` : `${verb} [{bar}] {percentage}%`;
  // Shown off a terminal too when asked for (-p): a line per update interval instead of a redraw.
  return new Bar({ format, stream: process.stderr, noTTYOutput: true, notTTYSchedule: 1000 });
}
