// destroy: delete an image file, but not while something depends on it: a live imgbd attach
// (the state files of src/kernel/state.ts name the image by real path) or another image of
// the same directory whose backing file resolves to it (qcow2 and qed headers). force skips both.

import { readdir, realpath, stat, unlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import '../formats/registry.js';
import { ImgbdError } from '../errors.js';
import { probeFormat, readProbeHead } from '../formats/probe.js';
import { listDeviceStates, runDir } from '../kernel/state.js';
import { readBackingReference } from './backing-header.js';
import { resolveBackingName } from './chain.js';

export class ImageInUseError extends ImgbdError {
  constructor(message: string) {
    super('ERR_IMAGE_IN_USE', message);
  }
}

export interface ImageUsers {
  /** /dev/nbdN devices a live supervisor serves the image on. */
  readonly attachedAs: string[];
  /** Images in the same directory whose backing file is this image. */
  readonly dependents: string[];
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function realOrSelf(p: string): Promise<string> {
  try {
    return await realpath(p);
  } catch {
    return p;
  }
}

export async function findImageUsers(path: string, stateDir: string = runDir()): Promise<ImageUsers> {
  const target = await realpath(path);
  const attachedAs: string[] = [];
  for (const s of listDeviceStates(stateDir).states) {
    if (alive(s.pid) && (await realOrSelf(s.image)) === target) attachedAs.push(s.device);
  }
  const dependents: string[] = [];
  const dir = dirname(target);
  for (const name of await readdir(dir)) {
    const candidate = join(dir, name);
    if (candidate === target) continue;
    try {
      if (!(await stat(candidate)).isFile()) continue;
      const format = probeFormat(await readProbeHead(candidate));
      if (format !== 'qcow2' && format !== 'qed') continue;
      const ref = await readBackingReference(candidate, format);
      if (ref.backingFile === null) continue;
      if ((await realOrSelf(resolveBackingName(candidate, ref.backingFile))) === target) dependents.push(candidate);
    } catch {
      // Unreadable or malformed files cannot be opened through their backing file either.
      continue;
    }
  }
  return { attachedAs, dependents };
}

/** Delete `path`; refuses with ImageInUseError while it is attached or backs another image. */
export async function destroyImage(path: string, o: { force?: boolean; stateDir?: string } = {}): Promise<ImageUsers> {
  const users = await findImageUsers(path, o.stateDir);
  if (!o.force) {
    if (users.attachedAs.length > 0) throw new ImageInUseError(`${path} is attached as ${users.attachedAs.join(', ')}: detach it first (or --force)`);
    if (users.dependents.length > 0) throw new ImageInUseError(`${path} is the backing file of ${users.dependents.join(', ')} (commit or rebase them first, or --force)`);
  }
  await unlink(path);
  return users;
}
