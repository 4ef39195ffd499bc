// imgbd list URI: the exports an NBD server offers (NBD_OPT_LIST, then NBD_OPT_INFO each).

import { NbdClient } from '../../client/index.js';
import { exportJson, exportText } from '../lib/export-json.js';

export async function run(args: string[], opts: Record<string, unknown>): Promise<number> {
  const uri = args[0]!;
  const entries = await NbdClient.list(uri);
  const details = [];
  for (const e of entries) {
    const info = await NbdClient.info(uri, e.name);
    const contexts = await NbdClient.listMetaContexts(uri, { exportName: e.name }).catch(() => []);
    details.push({ info: { ...info, description: info.description ?? (e.description || undefined) }, contexts });
  }
  if (opts.json) {
    process.stdout.write(`${JSON.stringify({ exports: details.map((d) => exportJson(d.info, d.contexts)) }, null, 2)}\n`);
  } else {
    for (const d of details) process.stdout.write(exportText(d.info, d.contexts));
  }
  return 0;
}
