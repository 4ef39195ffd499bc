// One boot of the kernel VM for `imgbd run` and the qemu-nbd drop-in (guest/run-guest.ts):
// a busybox rootfs image built here (ext4 from mke2fs -d, partition 1 of a GPT disk, qcow2),
// run read-only and read-write, CMD's status and signals, kill -9 of imgbd run, and
// `qemu-nbd -c/-d` through the bin/qemu-nbd shim, then real LXC 5 starting a container
// from `lxc.rootfs.path = nbd:IMAGE:1` with the real qemu-nbd made unusable.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { requirePeers, tempDir } from '../helpers/peers.js';
import { assertVmChecks, SH_CHECK_PRELUDE, vmChecks, vmTimings } from './checks.js';
import { RUN_GUEST_SCRIPT } from './guest/run-guest.js';
import { buildRootfsImages, HELLO } from './guest/run-rootfs.js';
import { guestNodeCommand, requireVm, runInVm, shQuote } from './harness.js';

/** LXC 5 on the host root the guest shares (read-only there, so installed here). */
function ensureLxc(): boolean {
  if (existsSync('/usr/bin/lxc-start')) return true;
  if (process.getuid?.() !== 0) return false;
  try {
    execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', 'lxc'], { stdio: 'ignore', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' }, timeout: 600_000 });
  } catch {
    return false;
  }
  return existsSync('/usr/bin/lxc-start');
}

function script(): string {
  const imgbd = guestNodeCommand(new URL('../../src/cli/main', import.meta.url));
  // The shim runs what this test runs: the sources under tsx, or the compiled tree.
  const shimMode = import.meta.url.endsWith('.ts') ? 'ts' : 'dist';
  return `set -u
SUITE=run
${SH_CHECK_PRELUDE}
# imgbd_bg execs, so that $! of "imgbd_bg ... &" is the node process itself.
imgbd() { ${imgbd} "$@"; }
imgbd_bg() { exec ${imgbd} "$@"; }
IMGBD=imgbd
HELLO=${shQuote(HELLO)}
SHIM_MODE=${shimMode}
${RUN_GUEST_SCRIPT}
`;
}

function ext4File(raw: string, path: string): string {
  const table = JSON.parse(execFileSync('sfdisk', ['--json', raw]).toString()) as { partitiontable: { partitions: Array<{ start: number; size: number }> } };
  const p = table.partitiontable.partitions[0]!;
  const part = `${raw}.p1`;
  writeFileSync(part, readFileSync(raw).subarray(p.start * 512, (p.start + p.size) * 512));
  execFileSync('e2fsck', ['-fn', part], { stdio: 'pipe' });
  return execFileSync('debugfs', ['-R', `cat ${path}`, part], { stdio: ['ignore', 'pipe', 'ignore'] }).toString();
}

test('kernel VM: imgbd run and the qemu-nbd drop-in (LXC)', { timeout: 900_000 }, async (t) => {
  if (!requireVm(t) || !requirePeers(t, 'qemu-img', 'sfdisk', 'mke2fs', 'e2fsck', 'debugfs')) return;
  const lxc = ensureLxc();
  const dir = tempDir(t, 'imgbd-vm-run-');
  const { qcow2 } = buildRootfsImages(dir);
  // Separate copies: the read-write run and LXC each write their own.
  execFileSync('cp', [qcow2, join(dir, 'rw.qcow2')]);
  execFileSync('cp', [qcow2, join(dir, 'lxc.qcow2')]);
  execFileSync('cp', [qcow2, join(dir, 'shim.qcow2')]);
  const r = await runInVm({ script: script(), scratchDir: dir, timeoutMs: 540_000, memoryMb: 2048 });
  t.diagnostic(`boot to poweroff: ${r.elapsedMs} ms; ${vmTimings(r).map((x) => `${x.timing} ${x.ms} ms`).join(', ')}`);
  for (const c of [...vmChecks(r, 'lxc-info'), ...vmChecks(r, 'lxc')]) t.diagnostic(`lxc ${c.check}: ${c.ok ? 'ok' : 'FAILED'} ${JSON.stringify(c.detail)}`);

  await t.test('guest script finished', () => {
    assert.equal(r.exitCode, 0, `guest output:\n${r.output.slice(-3000)}\nconsole:\n${r.console.slice(-3000)}`);
  });

  await t.test('run: prints a file of the image, returns CMD status 7, PID 1 in its own namespaces', () => {
    assertVmChecks(r, 'run', ['run-output', 'run-status-7', 'run-pid1-and-namespaces', 'run-dev-minimal', 'run-readonly-root', 'run-not-found-127', 'after-run-nothing-left']);
  });

  await t.test('run: signals end CMD with 128+N, after the forwarded signal', () => {
    assertVmChecks(r, 'run', ['run-sigterm-twice-137']);
  });

  await t.test('run --rw: the write reaches the image, unmounted cleanly before the detach', () => {
    assertVmChecks(r, 'run', ['run-rw-write']);
    const raw = join(dir, 'rw.raw');
    execFileSync('qemu-img', ['check', '-q', join(dir, 'rw.qcow2')], { stdio: 'pipe' });
    execFileSync('qemu-img', ['convert', '-O', 'raw', join(dir, 'rw.qcow2'), raw]);
    assert.equal(ext4File(raw, '/root/written'), 'written inside the container\n');
  });

  await t.test('kill -9 of imgbd run: CMD dies, the supervisor unmounts and detaches', () => {
    assertVmChecks(r, 'run', ['sigkill-cmd-running', 'sigkill-cmd-gone', 'sigkill-device-released', 'sigkill-supervisor-gone']);
  });

  await t.test('qemu-nbd shim: -c serves in the foreground with partitions, -d disconnects, -c exits 0', () => {
    assertVmChecks(r, 'shim', ['install-shim', 'c-partition-node', 'c-mount-read', 'd-disconnects', 'c-exit-0', 'd-released', 'd-unconnected-ok', 'c-busy-refused']);
    execFileSync('qemu-img', ['check', '-q', join(dir, 'shim.qcow2')], { stdio: 'pipe' });
  });

  await t.test('LXC 5 with only the drop-in as qemu-nbd: same calls and same outcome as with QEMU\'s qemu-nbd', (st) => {
    if (!lxc) {
      if (process.env.CI === 'true') assert.fail('lxc is not installed and could not be installed');
      st.skip('lxc not installed');
      return;
    }
    // LXC 5.0.2 (Debian 12) never runs qemu-nbd for `lxc.rootfs.path = nbd:IMAGE:1`: the
    // config keeps the path without its "nbd:" prefix (the pinning error quotes it so), so
    // attach_block_device() finds nothing to attach, and storage_init() has already copied
    // nbd_idx = -1 into the storage, so nbd_mount() fails at once: "Failed to mount rootfs".
    // The guest shows it by recording every qemu-nbd call: none, with QEMU's own as with the
    // drop-in. What is asserted: LXC behaves identically with the drop-in alone in PATH (same
    // calls, same status, same errors), never reaches the real qemu-nbd, and leaves no device
    // connected; with an LXC that does run qemu-nbd, the same checks cover its -c and -d.
    assertVmChecks(r, 'lxc', ['lxc-calls-same-as-qemu-nbd', 'lxc-real-qemu-nbd-unused', 'lxc-device-released', 'lxc-same-outcome-as-qemu-nbd']);
    const started = vmChecks(r, 'lxc-info').find((c) => c.check === 'lxc-start-shim')?.ok === true;
    if (started) {
      // An LXC that mounts nbd roots: the container's init wrote into the image.
      assertVmChecks(r, 'lxc', ['lxc-output']);
      const raw = join(dir, 'lxc.raw');
      execFileSync('qemu-img', ['check', '-q', join(dir, 'lxc.qcow2')], { stdio: 'pipe' });
      execFileSync('qemu-img', ['convert', '-O', 'raw', join(dir, 'lxc.qcow2'), raw]);
      assert.match(ext4File(raw, '/lxc-was-here'), /^pid 1\n$/);
    }
  });
});
