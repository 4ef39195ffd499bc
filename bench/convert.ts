// Conversion rows for `npm run bench`: imgbd convert against qemu-img convert (its defaults, and
// -m 8 -W) on one image of mixed content (random data, text-like compressible data, written
// zeros, holes): qcow2 -> raw, raw -> qcow2, raw -> qcow2 -c with zlib and zstd. Every imgbd
// output is checked with qemu-img compare. Wall-clock seconds, best of BENCH_CONVERT_RUNS
// (default: 10 runs uncompressed, 3 compressed).
// Neither flushes its target by default (-t unsafe); both do with -t writeback, compared too.
//
// Before each run, 1 GiB of memory is touched and freed. On a VM whose host takes back the
// memory a guest leaves free for a moment (free page reporting), a run that starts after an
// idle spell (the flush of a -t writeback run before it) fills the page cache with memory the
// host must fault in again: the same zstd convert took 0.28-0.33 s right after another run and
// 0.32-0.62 s after 2.5 s of idleness, and 0.28-0.33 s again with this warm-up in between.
// Every tool starts from the same, warm, state, as on a machine without that.

import { spawn } from 'node:child_process';
import { closeSync, ftruncateSync, mkdtempSync, openSync, rmSync, statSync, writeSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { availableParallelism, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const MiB = 1024 * 1024;
/** Memory touched and freed before each run (see above). */
const WARM_BYTES = 1024 * MiB;

interface Tool {
  readonly name: string;
  readonly argv: (from: string, fromFmt: string, to: string, toFmt: string, extra: readonly string[]) => [string, string[]];
}

interface ConvertRow {
  readonly label: string;
  readonly from: 'raw' | 'qcow2';
  readonly to: 'raw' | 'qcow2';
  readonly extra: readonly string[];
}

// The imgbd command as users run it (bin/imgbd, what an npm install links).
const IMGBD = resolve('bin/imgbd');

const TOOLS: readonly Tool[] = [
  { name: 'imgbd', argv: (f, ff, t, tf, x) => [IMGBD, ['convert', '-q', '-f', ff, '-O', tf, ...x, f, t]] },
  { name: 'imgbd -t writeback', argv: (f, ff, t, tf, x) => [IMGBD, ['convert', '-q', '-t', 'writeback', '-f', ff, '-O', tf, ...x, f, t]] },
  { name: 'imgbd 1 thread', argv: (f, ff, t, tf, x) => [IMGBD, ['convert', '-q', '--threads', '1', '-f', ff, '-O', tf, ...x, f, t]] },
  { name: 'qemu-img', argv: (f, ff, t, tf, x) => ['qemu-img', ['convert', '-f', ff, '-O', tf, ...x, f, t]] },
  { name: 'qemu-img -m 8 -W', argv: (f, ff, t, tf, x) => ['qemu-img', ['convert', '-m', '8', '-W', '-f', ff, '-O', tf, ...x, f, t]] },
  { name: 'qemu-img -t writeback', argv: (f, ff, t, tf, x) => ['qemu-img', ['convert', '-t', 'writeback', '-f', ff, '-O', tf, ...x, f, t]] },
];

const ROWS: readonly ConvertRow[] = [
  { label: 'qcow2 -> raw', from: 'qcow2', to: 'raw', extra: [] },
  { label: 'raw -> qcow2', from: 'raw', to: 'qcow2', extra: [] },
  { label: 'raw -> qcow2 -c zlib', from: 'raw', to: 'qcow2', extra: ['-c', '-o', 'compression_type=zlib'] },
  { label: 'raw -> qcow2 -c zstd', from: 'raw', to: 'qcow2', extra: ['-c', '-o', 'compression_type=zstd'] },
];

/** Per MiB, cycling: random, text-like, written zeros, hole. */
export function makeMixed(path: string, sizeBytes: number): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, sizeBytes);
    const words = ['block', 'device', 'cluster', 'sector', 'qcow2', 'image', 'extent', 'refcount', '\n'];
    const text = Buffer.alloc(MiB);
    let p = 0;
    let i = 0;
    while (p < MiB) p += text.write(`${words[(i++ * 7) % words.length]!}${i % 13} `, p);
    const rnd = Buffer.alloc(MiB);
    const zeros = Buffer.alloc(MiB);
    for (let off = 0, m = 0; off < sizeBytes; off += MiB, m++) {
      const kind = m % 4;
      if (kind === 3) continue;
      if (kind === 0) randomFillSync(rnd);
      writeSync(fd, kind === 0 ? rnd : kind === 1 ? text : zeros, 0, Math.min(MiB, sizeBytes - off), off);
    }
  } finally {
    closeSync(fd);
  }
}

function runTimed(cmd: string, args: string[]): Promise<number> {
  return new Promise((resolvePromise, reject) => {
    const start = process.hrtime.bigint();
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('exit', (code) => {
      if (code !== 0) reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err}`));
      else resolvePromise(Number(process.hrtime.bigint() - start) / 1e9);
    });
  });
}

export async function runConvertBench(only: readonly string[]): Promise<void> {
  if (only.length > 0 && !only.some((o) => 'convert'.includes(o) || o.includes('convert'))) return;
  const sizeBytes = Number(process.env.BENCH_CONVERT_SIZE ?? 1024 ** 3);
  // An uncompressed convert takes ~0.15-0.2 s here while one run in three (in some hours one in
  // two, for every tool) spends two to four times as long in the kernel (0.5-0.8 s of system
  // time for the same 512 MiB written): those rows take more runs to find each tool's best.
  const plainRuns = Number(process.env.BENCH_CONVERT_RUNS ?? 10);
  const compressedRuns = Number(process.env.BENCH_CONVERT_RUNS ?? 3);
  const dir = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), 'imgbd-bench-convert-'));
  try {
    const src = { raw: join(dir, 'mixed.raw'), qcow2: join(dir, 'mixed.qcow2') };
    makeMixed(src.raw, sizeBytes);
    await runTimed('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', src.raw, src.qcow2]);
    const table: { row: ConvertRow; seconds: Map<string, number>; sizes: Map<string, number> }[] = [];
    for (const row of ROWS) {
      const seconds = new Map<string, number>();
      const sizes = new Map<string, number>();
      const tools = TOOLS.filter((tool) => tool.name !== 'imgbd 1 thread' || row.extra.includes('-c'));
      // Tools take turns run after run, so a slow spell of the (shared) machine hits them all,
      // starting one place further each run: the run after a long one is often slow here, and
      // that should not always be the same tool's.
      const runs = row.extra.includes('-c') ? compressedRuns : plainRuns;
      for (let r = 0; r < runs; r++) {
        for (const tool of [...tools.slice(r % tools.length), ...tools.slice(0, r % tools.length)]) {
          const out = join(dir, `out.${row.to}`);
          try {
            rmSync(out, { force: true });
            await runTimed(process.execPath, ['-e', `Buffer.allocUnsafe(${WARM_BYTES}).fill(1)`]);
            const [cmd, args] = tool.argv(src[row.from], row.from, out, row.to, row.extra);
            const took = await runTimed(cmd, args);
            if (r === 0 && tool.name.startsWith('imgbd')) await runTimed('qemu-img', ['compare', '-q', '-f', row.from, '-F', row.to, src[row.from], out]);
            seconds.set(tool.name, Math.min(took, seconds.get(tool.name) ?? Infinity));
            sizes.set(tool.name, statSync(out).blocks * 512);
            process.stderr.write(`${tool.name.padEnd(18)} ${row.label.padEnd(24)} ${took.toFixed(2)} s\n`);
          } catch (err) {
            process.stderr.write(`${tool.name}: ${row.label}: ${(err as Error).message}\n`);
          } finally {
            rmSync(out, { force: true });
          }
        }
      }
      table.push({ row, seconds, sizes });
    }
    const gib = sizeBytes / 1024 ** 3;
    const cell = (s: number | undefined): string => (s === undefined ? 'n/a' : `${s.toFixed(2)} s (${(gib / s).toFixed(2)} GiB/s)`);
    const speed = (a: number | undefined, b: number | undefined): string => (a && b ? `${(b / a).toFixed(2)}x` : 'n/a');
    const header = ['convert', ...TOOLS.map((t) => t.name), 'imgbd vs qemu-img', 'imgbd vs qemu-img -m 8 -W', '-t writeback: imgbd vs qemu-img', 'output imgbd / qemu-img'];
    console.log(`\nconvert, ${gib.toFixed(2)} GiB image (random, text, written zeros, holes; ${availableParallelism()} cores); speed ratios > 1: imgbd faster`);
    console.log(`| ${header.join(' | ')} |`);
    console.log(`|${header.map(() => '---').join('|')}|`);
    for (const { row, seconds, sizes } of table) {
      const im = seconds.get('imgbd');
      const sz = sizes.get('imgbd') && sizes.get('qemu-img') ? `${(sizes.get('imgbd')! / MiB).toFixed(0)} / ${(sizes.get('qemu-img')! / MiB).toFixed(0)} MiB` : 'n/a';
      console.log(`| ${[row.label, ...TOOLS.map((t) => cell(seconds.get(t.name))), speed(im, seconds.get('qemu-img')), speed(im, seconds.get('qemu-img -m 8 -W')), speed(seconds.get('imgbd -t writeback'), seconds.get('qemu-img -t writeback')), sz].join(' | ')} |`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
