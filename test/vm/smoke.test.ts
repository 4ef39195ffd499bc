// One boot of the kernel VM that proves it can host the kernel tests: the nbd module loads
// with the parameters the attach code relies on, Debian's qemu-nbd + nbd-client attach an
// image that the guest partitions, formats, mounts and writes (checked here on the host),
// and this project's NbdNetlink client connects, serves, reconfigures and disconnects a
// device (guest/nbd-netlink-guest.ts, same boot).

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { tempDir } from '../helpers/peers.js';
import { requireVm, runInVm, type VmResult } from './harness.js';

const IMAGE_BYTES = 64 * 1024 * 1024;

interface Check {
  readonly suite: string;
  readonly check: string;
  readonly ok: boolean;
  readonly detail?: unknown;
}

interface Timing {
  readonly timing: string;
  readonly ms: number;
}

/** The guest script for the netlink checks, run the way this file itself is run. */
function guestNodeCommand(): string {
  const self = fileURLToPath(import.meta.url);
  const ext = self.endsWith('.ts') ? '.ts' : '.js';
  const script = join(self, '..', 'guest', `nbd-netlink-guest${ext}`);
  return ext === '.ts' ? `node --import tsx ${script}` : `node --enable-source-maps ${script}`;
}

function smokeScript(): string {
  return `set -u
R="$IMGBD_VM_RESULTS"
S="$IMGBD_VM_SCRATCH"
now() { date +%s%3N; }
T0=$(now)
LAST=$T0
report() {
  d=$(printf '%s' "$3" | tail -c 400 | tr -d '"\\\\' | tr '\\n\\r\\t' '   ')
  printf '{"suite":"smoke","check":"%s","ok":%s,"detail":"%s"}\\n' "$1" "$2" "$d" >> "$R"
}
check() {
  name=$1; shift
  if out=$("$@" 2>&1); then report "$name" true "$out"; else report "$name" false "$out"; return 1; fi
}
timing() {
  t=$(now)
  printf '{"timing":"%s","ms":%s}\\n' "$1" "$((t - LAST))" >> "$R"
  LAST=$t
}
wait_for() { # seconds, command...
  n=$(($1 * 10)); shift
  while [ $n -gt 0 ]; do "$@" && return 0; sleep 0.1; n=$((n - 1)); done
  "$@"
}

check modprobe-nbd modprobe nbd nbds_max=16 max_part=16
check sys-block-nbd0 test -e /sys/block/nbd0
check nbds-max sh -c 'test "$(ls -d /sys/block/nbd* | wc -l)" -eq 16'
check max-part sh -c 'test "$(cat /sys/module/nbd/parameters/max_part)" -ge 16'
timing modprobe

mkdir -p /tmp/mnt
check qemu-nbd-serve qemu-nbd --fork --persistent --pid-file=/run/qemu-nbd.pid -k /run/s.sock -f raw --cache=none "$S/disk.raw"
check nbd-client-attach nbd-client -u /run/s.sock /dev/nbd0 -b 512
check nbd0-size wait_for 10 sh -c 'test "$(cat /sys/block/nbd0/size)" -eq ${IMAGE_BYTES / 512}'
check sfdisk sh -c 'echo "start=2048, type=83" | sfdisk -q --no-reread /dev/nbd0 && blockdev --rereadpt /dev/nbd0'
check partition-node wait_for 10 test -b /dev/nbd0p1
check mkfs-ext4 mkfs.ext4 -q -F -L imgbd-vm /dev/nbd0p1
check mount-ext4 mount -t ext4 /dev/nbd0p1 /tmp/mnt
check write-file sh -c 'echo "written by the guest kernel" > /tmp/mnt/hello.txt && sync'
check umount umount /tmp/mnt
check nbd-client-detach nbd-client -d /dev/nbd0
check nbd0-released wait_for 10 sh -c 'test "$(cat /sys/block/nbd0/size)" -eq 0'
kill "$(cat /run/qemu-nbd.pid)" 2>/dev/null
timing peers-attach-mkfs-mount

${guestNodeCommand()}
timing netlink-node-script
`;
}

function checks(r: VmResult): Check[] {
  return r.results.filter((x): x is Check => typeof (x as Check).check === 'string');
}

function assertChecks(r: VmResult, suite: string, names: readonly string[]): void {
  const got = checks(r).filter((c) => c.suite === suite);
  const failed = got.filter((c) => !c.ok);
  assert.deepEqual(failed, [], `failed ${suite} checks; guest output:\n${r.output.slice(-3000)}`);
  for (const name of names) {
    assert.ok(got.some((c) => c.check === name), `${suite} check ${name} did not run; guest output:\n${r.output.slice(-3000)}\nconsole:\n${r.console.slice(-2000)}`);
  }
}

test('kernel VM: nbd module, Debian peers attach, netlink CONNECT', { timeout: 600_000 }, async (t) => {
  if (!requireVm(t)) return;
  const dir = tempDir(t, 'imgbd-vm-smoke-');
  const image = join(dir, 'disk.raw');
  const fd = openSync(image, 'w');
  closeSync(fd);
  execFileSync('truncate', ['-s', String(IMAGE_BYTES), image]);

  const r = await runInVm({ script: smokeScript(), scratchDir: dir, timeoutMs: 300_000 });
  const timings = r.results.filter((x): x is Timing => typeof (x as Timing).timing === 'string');
  t.diagnostic(`boot to poweroff: ${r.elapsedMs} ms; ${timings.map((x) => `${x.timing} ${x.ms} ms`).join(', ')}`);
  writeFileSync(join(dir, 'console.log'), r.console);

  await t.test('script finished', () => {
    assert.equal(r.exitCode, 0, `guest output:\n${r.output.slice(-3000)}\nconsole:\n${r.console.slice(-3000)}`);
  });

  await t.test('nbd module loads with nbds_max=16 max_part=16', () => {
    assertChecks(r, 'smoke', ['modprobe-nbd', 'sys-block-nbd0', 'nbds-max', 'max-part']);
  });

  await t.test('qemu-nbd + nbd-client: partition, mkfs.ext4, mount, write, detach', () => {
    assertChecks(r, 'smoke', ['nbd-client-attach', 'nbd0-size', 'partition-node', 'mkfs-ext4', 'mount-ext4', 'write-file', 'umount', 'nbd-client-detach', 'nbd0-released']);
    // The host sees what the guest kernel wrote: the partition table, then the file in ext4.
    const table = JSON.parse(execFileSync('sfdisk', ['--json', image]).toString()) as {
      partitiontable: { partitions: Array<{ start: number; size: number }> };
    };
    const part = table.partitiontable.partitions[0];
    assert.ok(part, 'no partition in the image');
    assert.equal(part.start, 2048);
    const partImage = join(dir, 'part.img');
    const bytes = readFileSync(image).subarray(part.start * 512, (part.start + part.size) * 512);
    writeFileSync(partImage, bytes);
    execFileSync('e2fsck', ['-fn', partImage], { stdio: 'pipe' });
    const content = execFileSync('debugfs', ['-R', 'cat /hello.txt', partImage], { stdio: ['ignore', 'pipe', 'ignore'] }).toString();
    assert.equal(content, 'written by the guest kernel\n');
  });

  await t.test('NbdNetlink: CONNECT picks a device, dd through it, STATUS, RECONFIGURE, DISCONNECT', () => {
    assertChecks(r, 'netlink', [
      'resolve-family',
      'status-lists-devices',
      'connect-picks-index',
      'sysfs-size-and-identity',
      'status-connected',
      'connect-busy-index-refused',
      'dd-write-reaches-server',
      'dd-read-from-server',
      'reconfigure-needs-backend',
      'reconfigure-timeout',
      'disconnect',
      'reconfigure-unconnected-refused',
      'disconnect-on-close',
    ]);
  });
});
