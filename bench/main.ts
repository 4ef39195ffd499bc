// `npm run bench`: the same image served by imgbd, qemu-nbd (default and --aio=io_uring)
// and nbdkit, driven by the same clients (nbdcopy, fio's nbd engine). Only ratios measured
// in one run mean anything: the machine is shared and noisy.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureRandomFile, makeQcow2, runClient, startServer, writeBack, type ServerKind, type ServerHandle } from './lib.js';
import { ROWS, serversFor, type Row } from './rows.js';

interface Result {
  readonly row: Row;
  readonly values: Map<ServerKind, number>;
}

const SERVERS: readonly ServerKind[] = ['imgbd', 'qemu-nbd', 'qemu-nbd-io_uring', 'nbdkit'];
/** Rounds of each fresh-image row per server (each on a new image). */
const FRESH_ROUNDS = Number(process.env.BENCH_FRESH_ROUNDS ?? 4);
/** Rounds of the nbdcopy rows on shared images (see main). */
const SHARED_ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2);

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
    const qcow2Image = join(dir, 'disk.qcow2');
    if (rows.some((r) => r.format === 'qcow2' && !r.fresh)) await makeQcow2(qcow2Image, image, sizeBytes);
    const report = (kind: ServerKind, res: Result, value: number): void => {
      // Higher is better in every row; a row measured more than once keeps its best.
      res.values.set(kind, Math.max(value, res.values.get(kind) ?? 0));
      process.stderr.write(`${kind.padEnd(18)} ${res.row.label.padEnd(28)} ${fmt(res.row, value)}\n`);
    };
    // Rows that share an image share one server per kind; fresh-image rows get their own.
    // The nbdcopy rows run again in later rounds, the servers in reverse order every other
    // round: a copy's speed here depends on where in the run it comes (nbdkit wrote at 4.06
    // GiB/s last and 2.99 first, imgbd at 2.41 first and 2.76 last), and no server should
    // always come first. The fio rows, which average over seconds, run in the first round only.
    for (const [format, path] of [['raw', image], ['qcow2', qcow2Image]] as const) {
      const shared = results.filter((r) => (r.row.format ?? 'raw') === format && !r.row.fresh);
      for (let round = 0; round < SHARED_ROUNDS; round++) {
        const rows = round === 0 ? shared : shared.filter((r) => r.row.client !== 'fio');
        if (rows.length === 0) break;
        const servers = serversFor(rows[0]!.row, SERVERS);
        for (const kind of round % 2 === 0 ? servers : servers.reverse()) {
          let server: ServerHandle | undefined;
          try {
            server = await startServer(kind, path, dir, format);
            for (const res of rows) report(kind, res, await runClient(res.row, server.uri, { source, sizeBytes, seconds, image: path }));
          } catch (err) {
            process.stderr.write(`${kind}: ${(err as Error).message}\n`);
          } finally {
            await server?.stop();
          }
        }
      }
    }
    // Fresh-image rows: rounds alternate between the servers, each on a new image after the
    // page cache is written back, and each server's best round counts. Who goes first swaps every
    // round: a round inherits the memory its predecessor just freed (quick to reuse) or freed
    // long ago (on this machine handed back to the hypervisor, slow to touch again).
    for (const res of results.filter((r) => r.row.fresh)) {
      for (let round = 0; round < FRESH_ROUNDS; round++) {
        const servers = serversFor(res.row, SERVERS);
        for (const kind of round % 2 === 0 ? servers : servers.reverse()) {
          const fresh = join(dir, `fresh-${kind}.qcow2`);
          let server: ServerHandle | undefined;
          try {
            await makeQcow2(fresh, null, sizeBytes);
            await writeBack();
            server = await startServer(kind, fresh, dir, 'qcow2');
            report(kind, res, await runClient(res.row, server.uri, { source, sizeBytes, seconds, image: fresh }));
          } catch (err) {
            process.stderr.write(`${kind}: ${(err as Error).message}\n`);
          } finally {
            await server?.stop();
            rmSync(fresh, { force: true });
          }
        }
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

// The conversion rows (bench/convert.ts) run after the server rows.
await (await import('./convert.js')).runConvertBench(process.argv.slice(2));
