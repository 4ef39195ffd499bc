// Building a container's root inside its own mount namespace, from the calling thread only
// (see src/sys/namespace.ts for why everything is synchronous):
//
//   stageRoot      make every mount private, shadow the stage directory with a small tmpfs,
//                  mount the image's filesystem on <stage>/root
//   populateRoot   a fresh /proc (of the new pid namespace), /dev as a tmpfs holding only
//                  null zero full random urandom tty, the /proc/self/fd links, a private
//                  devpts instance on /dev/pts and a tmpfs on /dev/shm
//   enterRoot      pivot_root into it and detach the old root, so nothing of the host's
//                  mount tree stays reachable
//
// The image is mounted only in this namespace: when its last process exits the kernel
// unmounts it (writing the filesystem back) before that process is reported as exited.

import { existsSync, mkdirSync, statSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { ImgbdError } from '../errors.js';
import { MNT_DETACH, mknodChar, MS_NS, mountSync, pivotRoot, umountSync } from '../sys/namespace.js';
import type { RunPlan } from './run-protocol.js';

export class RootfsError extends ImgbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_ROOTFS', message, options);
  }
}

/** The character devices every container gets (major, minor), as in the OCI runtime spec's defaults. */
export const CONTAINER_DEVICES: ReadonlyArray<readonly [name: string, major: number, minor: number]> = [
  ['null', 1, 3],
  ['zero', 1, 5],
  ['full', 1, 7],
  ['random', 1, 8],
  ['urandom', 1, 9],
  ['tty', 5, 0],
];

const DEV_LINKS: ReadonlyArray<readonly [name: string, target: string]> = [
  ['fd', '/proc/self/fd'],
  ['stdin', '/proc/self/fd/0'],
  ['stdout', '/proc/self/fd/1'],
  ['stderr', '/proc/self/fd/2'],
  ['ptmx', 'pts/ptmx'],
];

/** Mount the image's filesystem on a private staging tmpfs; returns the new root's path. */
export function stageRoot(plan: RunPlan): string {
  // Nothing done from here on may propagate back to the host's mount namespace.
  mountSync(null, '/', null, MS_NS.REC | MS_NS.PRIVATE, null);
  mountSync('imgbd-run', plan.stageDir, 'tmpfs', MS_NS.NOSUID | MS_NS.NODEV, 'mode=0700,size=64k');
  const root = join(plan.stageDir, 'root');
  mkdirSync(root);
  mountSync(plan.device, root, plan.fstype, plan.mountFlags | (plan.readOnly ? MS_NS.RDONLY : 0), plan.mountData === '' ? null : plan.mountData);
  return root;
}

/** The directory `dir` of the image, created when the image is writable. */
function requireDir(root: string, dir: string, readOnly: boolean): string {
  const path = join(root, dir);
  if (existsSync(path)) {
    if (!statSync(path).isDirectory()) throw new RootfsError(`/${dir} in the image is not a directory`);
    return path;
  }
  if (readOnly) throw new RootfsError(`the image has no /${dir} directory and is mounted read-only: create it in the image, or run with --rw`);
  mkdirSync(path, { mode: 0o755 });
  return path;
}

export function populateRoot(root: string, readOnly: boolean): void {
  mountSync('proc', requireDir(root, 'proc', readOnly), 'proc', MS_NS.NOSUID | MS_NS.NODEV | MS_NS.NOEXEC, null);
  const dev = requireDir(root, 'dev', readOnly);
  mountSync('tmpfs', dev, 'tmpfs', MS_NS.NOSUID | MS_NS.STRICTATIME, 'mode=755,size=65536k');
  const umask = process.umask(0);
  try {
    for (const [name, major, minor] of CONTAINER_DEVICES) mknodChar(join(dev, name), 0o666, major, minor);
    for (const [name, target] of DEV_LINKS) symlinkSync(target, join(dev, name));
    mkdirSync(join(dev, 'pts'), { mode: 0o755 });
    mkdirSync(join(dev, 'shm'), { mode: 0o1777 });
  } finally {
    process.umask(umask);
  }
  // A new devpts instance: the container's ptys are its own, not the host's.
  mountSync('devpts', join(dev, 'pts'), 'devpts', MS_NS.NOSUID | MS_NS.NOEXEC, 'newinstance,ptmxmode=0666,mode=0620');
  mountSync('shm', join(dev, 'shm'), 'tmpfs', MS_NS.NOSUID | MS_NS.NODEV, 'mode=1777,size=65536k');
}

/**
 * pivot_root(".", ".") stacks the old root under the new one at "/", so no put_old directory
 * is needed in a possibly read-only image; the lazy unmount then drops the whole old tree.
 */
export function enterRoot(root: string): void {
  process.chdir(root);
  pivotRoot('.', '.');
  umountSync('.', MNT_DETACH);
  process.chdir('/');
}
