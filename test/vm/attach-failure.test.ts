// One boot of the kernel VM for the failure paths of `imgbd attach`
// (guest/attach-failure-guest.ts): kill -9 of the supervisor under a mounted filesystem,
// the watched process exiting, SIGHUP, the ioctl fallback, four connections, and a failed
// attach that must leave nothing connected. The host then checks the images.

import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { requirePeers, tempDir } from '../helpers/peers.js';
import { assertVmChecks, vmChecks, vmTimings } from './checks.js';
import { guestNodeCommand, requireVm, runInVm, shQuote } from './harness.js';

const MiB = 1024 * 1024;

function script(): string {
  const imgbd = guestNodeCommand(new URL('../../src/cli/main', import.meta.url));
  return `set -u
modprobe nbd nbds_max=16 max_part=16
# Report any task blocked for longer than twice the attach timeout (5 s).
echo 20 > /proc/sys/kernel/hung_task_timeout_secs
export IMGBD_CLI=${shQuote(imgbd)}
${guestNodeCommand(new URL('./guest/attach-failure-guest', import.meta.url))}
`;
}

test('kernel VM: attach failure paths — kill -9, watched process, signals, ioctl, multi-conn', { timeout: 960_000 }, async (t) => {
  if (!requireVm(t) || !requirePeers(t, 'mkfs.ext4', 'e2fsck', 'debugfs')) return;
  const dir = tempDir(t, 'imgbd-vm-attach-fail-');
  for (const name of ['k.img', 'w.img']) {
    execFileSync('truncate', ['-s', String(64 * MiB), join(dir, name)]);
    execFileSync('mkfs.ext4', ['-q', '-F', join(dir, name)]);
  }
  execFileSync('truncate', ['-s', String(32 * MiB), join(dir, 'i.img')]);
  const r = await runInVm({ script: script(), scratchDir: dir, timeoutMs: 840_000, memoryMb: 2048 });
  t.diagnostic(`boot to poweroff: ${r.elapsedMs} ms; ${vmTimings(r).map((x) => `${x.timing} ${x.ms} ms`).join(', ')}`);
  const io = vmChecks(r, 'attach-failure').find((c) => c.check === 'kill9-io-fails-within-timeout');
  if (io) t.diagnostic(`after kill -9 (timeout 5 s): ${JSON.stringify(io.detail)}`);

  await t.test('guest script finished', () => {
    assert.equal(r.exitCode, 0, `guest output:\n${r.output.slice(-3000)}\nconsole:\n${r.console.slice(-3000)}`);
  });

  await t.test('kill -9 while mounted: I/O fails within the timeout, no hung task, gc reclaims', () => {
    assertVmChecks(r, 'attach-failure', ['kill9-attach-mounted', 'kill9-io-fails-within-timeout', 'kill9-no-hung-task', 'kill9-list-shows-dead', 'kill9-gc-reclaims']);
    assert.doesNotMatch(r.console, /blocked for more than/);
    // What was synced before the kill is in the image; the journal replays cleanly.
    // 0: clean, 1: errors corrected (the journal replayed); anything else is damage.
    const fsck = spawnSync('e2fsck', ['-fy', join(dir, 'k.img')], { encoding: 'utf8' });
    assert.ok(fsck.status === 0 || fsck.status === 1, `e2fsck exited ${fsck.status}: ${fsck.stdout}${fsck.stderr}`);
    const before = execFileSync('debugfs', ['-R', 'cat /before', join(dir, 'k.img')], { stdio: ['ignore', 'pipe', 'ignore'] }).toString();
    assert.equal(before, 'before\n');
  });

  await t.test('watched process exit and SIGHUP: unmount, flush, disconnect, exit', () => {
    assertVmChecks(r, 'attach-failure', ['watch-pid-exit-tears-down', 'sighup-tears-down']);
    execFileSync('e2fsck', ['-fn', join(dir, 'w.img')], { stdio: 'pipe' });
  });

  await t.test('ioctl interface and four connections', () => {
    assertVmChecks(r, 'attach-failure', ['ioctl-interface', 'four-connections']);
    // The 8 MiB written over four connections reached the image.
    const want = readFileSync(join(dir, 'multiconn.sha256'), 'utf8').trim();
    const got = execFileSync('sha256sum', { input: readFileSync(join(dir, 'i.img')).subarray(0, 8 * MiB) }).toString().split(' ')[0];
    assert.equal(got, want);
  });

  await t.test('a failed attach leaves nothing behind', () => {
    assertVmChecks(r, 'attach-failure', ['failed-attach-leaves-nothing']);
  });
});
