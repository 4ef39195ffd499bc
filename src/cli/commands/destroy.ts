// imgbd destroy IMAGE: delete an image unless it is attached or backs another image (--force).

import { destroyImage } from '../../image/destroy.js';

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const o = opts as { force?: boolean; quiet?: boolean };
  const users = await destroyImage(args[0]!, { force: o.force === true });
  if (!o.quiet) {
    const notes = [...users.attachedAs.map((d) => `it was attached as ${d}`), ...users.dependents.map((d) => `${d} used it as its backing file`)];
    process.stdout.write(`Removed ${args[0]!}${notes.length > 0 ? ` (forced: ${notes.join('; ')})` : ''}.\n`);
  }
  return 0;
}
