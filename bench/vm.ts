// `npm run bench:vm`: /dev/nbdN served by `imgbd attach` against `qemu-nbd -c`, on the same
// raw image, inside the kernel VM (this host's kernel has no nbd driver). Sequential read and
// write with dd bs=1M (O_DIRECT), and 4 KiB random reads with fio (psync, O_DIRECT). Each
// server is measured ROUNDS times, alternating, and the best run counts: under TCG the first
// rounds run slower (guest code is translated as it is first met, and node meets more of it).
// Every round attaches afresh, so the sequential write is measured twice on each attachment:
// the first pass includes a new server warming up (under TCG node's compilers take a good
// part of it), the second is the steady state a long-lived attachment works in.
//
// The guest runs under TCG, so absolute figures say nothing about real hardware: only the
// ratio imgbd/qemu-nbd from one run is reported as meaningful.

import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { guestNodeCommand, runInVm } from '../test/vm/harness.js';
import { ensureRandomFile } from './lib.js';

const IMAGE_MIB = 128;
const ROUNDS = 3;
const FIO_SECONDS = 8;

type Server = 'imgbd' | 'qemu-nbd';
interface Sample {
  readonly bench: string;
  readonly server: Server;
  readonly round: number;
  readonly mibPerSec?: number;
  readonly fioFile?: string;
}

function guestScript(): string {
  const imgbd = guestNodeCommand(new URL('../src/cli/main', import.meta.url));
  return `set -u
S="$IMGBD_VM_SCRATCH"
R="$IMGBD_VM_RESULTS"
imgbd() { ${imgbd} "$@"; }
modprobe nbd nbds_max=4 max_part=0
cp "$S/bench.raw" /tmp/bench.raw
dd if=/dev/urandom of=/tmp/src.bin bs=1M count=${IMAGE_MIB} status=none
secs() { sed -n 's/.* copied, \\([0-9.e-]*\\) s.*/\\1/p' | tail -1; }
measure() { # server round device
  t=$(dd if="$3" of=/dev/null bs=1M iflag=direct 2>&1 | secs)
  echo "{\\"bench\\":\\"seq-read\\",\\"server\\":\\"$1\\",\\"round\\":$2,\\"seconds\\":$t}" >> "$R"
  for pass in first second; do
    t=$(dd if=/tmp/src.bin of="$3" bs=1M oflag=direct conv=fsync 2>&1 | secs)
    echo "{\\"bench\\":\\"seq-write ($pass pass)\\",\\"server\\":\\"$1\\",\\"round\\":$2,\\"seconds\\":$t}" >> "$R"
  done
  fio --name=randread --filename="$3" --rw=randread --bs=4k --ioengine=psync --direct=1 --iodepth=1 \\
      --runtime=${FIO_SECONDS} --time_based --output-format=json --output="$S/fio-$1-$2.json" >/dev/null 2>&1
  echo "{\\"bench\\":\\"rand-read-4k\\",\\"server\\":\\"$1\\",\\"round\\":$2,\\"fioFile\\":\\"fio-$1-$2.json\\"}" >> "$R"
}
for round in $(seq 1 ${ROUNDS}); do
  dev=$(imgbd attach -f raw /tmp/bench.raw) || { echo "imgbd attach failed"; exit 1; }
  measure imgbd $round "$dev"
  imgbd detach "$dev" >/dev/null || exit 1
  qemu-nbd -c /dev/nbd3 -f raw /tmp/bench.raw || exit 1
  n=0; while [ "$(cat /sys/block/nbd3/size)" = 0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  measure qemu-nbd $round /dev/nbd3
  qemu-nbd -d /dev/nbd3 >/dev/null
  n=0; while [ -e /sys/block/nbd3/pid ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
done
`;
}

function fioIops(path: string): number {
  const j = JSON.parse(readFileSync(path, 'utf8')) as { jobs: Array<{ read: { iops: number } }> };
  return j.jobs[0]!.read.iops;
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), 'imgbd-bench-vm-'));
  try {
    await ensureRandomFile(join(dir, 'bench.raw'), IMAGE_MIB * 1024 * 1024);
    const r = await runInVm({ script: guestScript(), scratchDir: dir, timeoutMs: 1_200_000, memoryMb: 2048 });
    if (r.exitCode !== 0) throw new Error(`guest script failed (${r.exitCode}):\n${r.output.slice(-2000)}`);
    const samples = (r.results as Array<Sample & { seconds?: number }>).map((s) => ({
      ...s,
      value: s.fioFile ? fioIops(join(dir, s.fioFile)) : (IMAGE_MIB / (s.seconds ?? Number.NaN)),
    }));
    const rows: string[] = ['| test | imgbd | qemu-nbd -c | imgbd/qemu-nbd |', '| --- | --- | --- | --- |'];
    for (const bench of ['seq-read', 'seq-write (first pass)', 'seq-write (second pass)', 'rand-read-4k']) {
      const best = (server: Server) => Math.max(...samples.filter((s) => s.bench === bench && s.server === server).map((s) => s.value));
      const a = best('imgbd');
      const b = best('qemu-nbd');
      const unit = bench === 'rand-read-4k' ? 'IOPS' : 'MiB/s';
      rows.push(`| ${bench} | ${a.toFixed(1)} ${unit} | ${b.toFixed(1)} ${unit} | ${(a / b).toFixed(2)}x |`);
    }
    process.stdout.write(`/dev/nbdN in a TCG guest, ${IMAGE_MIB} MiB raw image on tmpfs, best of ${ROUNDS} (absolute figures are meaningless under TCG):\n${rows.join('\n')}\n`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
