// The rootfs image the `imgbd run` and LXC VM tests boot from, built on the host: a
// busybox-static tree made into ext4 by mke2fs -d, placed in partition 1 ("root") of a GPT
// disk made by sfdisk, converted to qcow2 by qemu-img.

import { execFileSync } from 'node:child_process';
import { chmodSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

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

