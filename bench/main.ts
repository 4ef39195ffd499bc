// `npm run bench`: the same image served by imgbd, qemu-nbd (default and --aio=io_uring)
// and nbdkit, driven by the same clients (nbdcopy, fio's nbd engine). Only ratios measured
// in one run mean anything: the machine is shared and noisy.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureRandomFile, runClient, startServer, type ServerKind, type ServerHandle } from './lib.js';
import { ROWS, type Row } from './rows.js';

interface Result {
  readonly row: Row;
  readonly values: Map<ServerKind, number>;
}

const SERVERS: readonly ServerKind[] = ['imgbd', 'qemu-nbd', 'qemu-nbd-io_uring', 'nbdkit'];

function fmt(row: Row, v: number | undefined): string {
  if (v === undefined || Number.isNaN(v)) return 'n/a';
  return row.unit === 'GiB/s' ? `${v.toFixed(2)} GiB/s` : `${Math.round(v / 1000)}k IOPS`;
}

function ratio(a: number | undefined, b: number | undefined): string {
  if (!a || !b) return 'n/a';
  return `${(a / b).toFixed(2)}x`;
}

async function main(): Promise<void> {
  const only = process.argv.slice(2);
  const dir = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), 'imgbd-bench-'));
  const sizeBytes = Number(process.env.BENCH_SIZE ?? 1024 ** 3);
  const seconds = Number(process.env.BENCH_SECONDS ?? 8);
  try {
    const image = join(dir, 'disk.raw');
    const source = join(dir, 'source.raw');
    await ensureRandomFile(image, sizeBytes);
    await ensureRandomFile(source, sizeBytes);
    const rows = ROWS.filter((r) => only.length === 0 || only.some((o) => r.id.includes(o)));
    const results: Result[] = rows.map((row) => ({ row, values: new Map() }));
    for (const kind of SERVERS) {
      let server: ServerHandle | undefined;
      try {
        server = await startServer(kind, image, dir);
        for (const res of results) {
          const value = await runClient(res.row, server.uri, { source, sizeBytes, seconds });
          res.values.set(kind, value);
          process.stderr.write(`${kind.padEnd(18)} ${res.row.label.padEnd(28)} ${fmt(res.row, value)}\n`);
        }
      } catch (err) {
        process.stderr.write(`${kind}: ${(err as Error).message}\n`);
      } finally {
        await server?.stop();
      }
    }
    const header = ['row', ...SERVERS, 'imgbd/best qemu-nbd', 'imgbd/nbdkit'];
    const lines = results.map(({ row, values }) => {
      const q = Math.max(values.get('qemu-nbd') ?? 0, values.get('qemu-nbd-io_uring') ?? 0) || undefined;
      return [row.label, ...SERVERS.map((s) => fmt(row, values.get(s))), ratio(values.get('imgbd'), q), ratio(values.get('imgbd'), values.get('nbdkit'))];
    });
    console.log(`\n| ${header.join(' | ')} |`);
    console.log(`|${header.map(() => '---').join('|')}|`);
    for (const l of lines) console.log(`| ${l.join(' | ')} |`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
