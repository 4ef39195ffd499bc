// One boot of the kernel VM that proves it can host the kernel tests: the nbd module loads
// with the parameters the attach code relies on, Debian's qemu-nbd + nbd-client attach an
// image that the guest partitions, formats, mounts and writes (checked here on the host),
// and this project's NbdNetlink client connects, serves, reconfigures and disconnects a
// device (guest/nbd-netlink-guest.ts, same boot).

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { tempDir } from '../helpers/peers.js';
import { assertVmChecks, SH_CHECK_PRELUDE, vmTimings } from './checks.js';
import { guestNodeCommand, requireVm, runInVm } from './harness.js';

const IMAGE_BYTES = 64 * 1024 * 1024;

function smokeScript(): string {
  return `set -u
SUITE=smoke
${SH_CHECK_PRELUDE}
S="$IMGBD_VM_SCRATCH"

check modprobe-nbd modprobe nbd nbds_max=16 max_part=16
check sys-block-nbd0 test -e /sys/block/nbd0
check nbds-max sh -c 'test "$(ls -d /sys/block/nbd* | wc -l)" -eq 16'
# nbd rounds max_part up to 2^n-1 (31 for 16).
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

${guestNodeCommand(new URL('./guest/nbd-netlink-guest', import.meta.url))}
timing netlink-node-script
`;
}

test('kernel VM: nbd module, Debian peers attach, netlink CONNECT', { timeout: 600_000 }, async (t) => {
  if (!requireVm(t)) return;
  const dir = tempDir(t, 'imgbd-vm-smoke-');
  const image = join(dir, 'disk.raw');
  execFileSync('truncate', ['-s', String(IMAGE_BYTES), image]);

  const r = await runInVm({ script: smokeScript(), scratchDir: dir, timeoutMs: 300_000 });
  const timings = vmTimings(r);
  t.diagnostic(`boot to poweroff: ${r.elapsedMs} ms; ${timings.map((x) => `${x.timing} ${x.ms} ms`).join(', ')}`);

  await t.test('script finished', () => {
    assert.equal(r.exitCode, 0, `guest output:\n${r.output.slice(-3000)}\nconsole:\n${r.console.slice(-3000)}`);
  });

  await t.test('nbd module loads with nbds_max=16 max_part=16', () => {
    assertVmChecks(r, 'smoke', ['modprobe-nbd', 'sys-block-nbd0', 'nbds-max', 'max-part']);
  });

  await t.test('qemu-nbd + nbd-client: partition, mkfs.ext4, mount, write, detach', () => {
    assertVmChecks(r, 'smoke', ['nbd-client-attach', 'nbd0-size', 'partition-node', 'mkfs-ext4', 'mount-ext4', 'write-file', 'umount', 'nbd-client-detach', 'nbd0-released']);
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
    assertVmChecks(r, 'netlink', [
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
