// One boot of the kernel VM for `imgbd run` and the qemu-nbd drop-in (guest/run-guest.ts):
// a busybox rootfs image built here (ext4 from mke2fs -d, partition 1 of a GPT disk, qcow2),
// run read-only and read-write, CMD's status and signals, kill -9 of imgbd run, and
// `qemu-nbd -c/-d` through the bin/qemu-nbd shim, then real LXC 5 starting a container
// from `lxc.rootfs.path = nbd:IMAGE:1` with the real qemu-nbd made unusable.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { requirePeers, tempDir } from '../helpers/peers.js';
import { assertVmChecks, SH_CHECK_PRELUDE, vmChecks, vmTimings } from './checks.js';
import { RUN_GUEST_SCRIPT } from './guest/run-guest.js';
import { guestNodeCommand, requireVm, runInVm, shQuote } from './harness.js';

const MiB = 1024 * 1024;
export const HELLO = 'hello from the image';

/** A busybox-static root: /bin/busybox and its applet links, /etc/hello, an init script for LXC. */
function buildRootDir(dir: string): void {
  for (const d of ['bin', 'sbin', 'etc', 'dev', 'proc', 'sys', 'tmp', 'root', 'usr/bin', 'usr/sbin']) mkdirSync(join(dir, d), { recursive: true });
  writeFileSync(join(dir, 'bin/busybox'), readFileSync('/bin/busybox'));
  chmodSync(join(dir, 'bin/busybox'), 0o755);
  for (const applet of ['sh', 'cat', 'echo', 'ls', 'sleep', 'hostname', 'readlink', 'sync', 'kill', 'id', 'tr', 'head', 'stat', 'touch', 'grep', 'true', 'false']) {
    symlinkSync('busybox', join(dir, 'bin', applet));
  }
  writeFileSync(join(dir, 'etc/hello'), `${HELLO}\n`);
  writeFileSync(join(dir, 'etc/lxc-init'), '#!/bin/sh\ncat /etc/hello\necho "pid $$" > /lxc-was-here\nsync\n');
  chmodSync(join(dir, 'etc/lxc-init'), 0o755);
}

/** GPT disk with the ext4 root in partition 1 ("root"), as raw and qcow2. */
export function buildRootfsImages(dir: string): { qcow2: string; raw: string } {
  const tree = join(dir, 'tree');
  buildRootDir(tree);
  const part = join(dir, 'part.ext4');
  execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', 'imgbd-root', '-d', tree, part, '16M'], { stdio: 'pipe' });
  const raw = join(dir, 'rootfs.raw');
  execFileSync('truncate', ['-s', String(20 * MiB), raw]);
  execFileSync('sfdisk', ['-q', raw], { input: 'label: gpt\nstart=2048, size=32768, name=root\n' });
  execFileSync('dd', [`if=${part}`, `of=${raw}`, 'bs=1M', 'seek=1', 'conv=notrunc', 'status=none']);
  const qcow2 = join(dir, 'rootfs.qcow2');
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
  return { qcow2, raw };
}

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

test('kernel VM: imgbd run and the qemu-nbd drop-in (LXC)', { timeout: 600_000 }, async (t) => {
  if (!requireVm(t) || !requirePeers(t, 'qemu-img', 'sfdisk', 'mke2fs', 'e2fsck', 'debugfs')) return;
  const lxc = ensureLxc();
  const dir = tempDir(t, 'imgbd-vm-run-');
  const { qcow2 } = buildRootfsImages(dir);
  // Separate copies: the read-write run and LXC each write their own.
  execFileSync('cp', [qcow2, join(dir, 'rw.qcow2')]);
  execFileSync('cp', [qcow2, join(dir, 'lxc.qcow2')]);
  execFileSync('cp', [qcow2, join(dir, 'shim.qcow2')]);
  const r = await runInVm({ script: script(), scratchDir: dir, timeoutMs: 420_000, memoryMb: 2048 });
  t.diagnostic(`boot to poweroff: ${r.elapsedMs} ms; ${vmTimings(r).map((x) => `${x.timing} ${x.ms} ms`).join(', ')}`);
  for (const c of vmChecks(r, 'lxc')) t.diagnostic(`lxc ${c.check}: ${c.ok ? 'ok' : 'FAILED'} ${JSON.stringify(c.detail)}`);

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

  await t.test('LXC 5 starts a container from nbd:IMAGE:1 with only the shim as qemu-nbd', (st) => {
    if (!lxc) {
      if (process.env.CI === 'true') assert.fail('lxc is not installed and could not be installed');
      st.skip('lxc not installed');
      return;
    }
    assertVmChecks(r, 'lxc', ['lxc-start', 'lxc-output', 'lxc-real-qemu-nbd-unused', 'lxc-device-released']);
    const raw = join(dir, 'lxc.raw');
    execFileSync('qemu-img', ['check', '-q', join(dir, 'lxc.qcow2')], { stdio: 'pipe' });
    execFileSync('qemu-img', ['convert', '-O', 'raw', join(dir, 'lxc.qcow2'), raw]);
    assert.match(ext4File(raw, '/lxc-was-here'), /^pid 1\n$/);
  });
});
