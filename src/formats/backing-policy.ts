// Where a backing file (or an external data file) named inside an image may be opened from, and
// as what. The name is untrusted image data: "the backing file name ... may be relative to the
// image file" (qcow2.txt), so an image could otherwise point at any file on the host (a
// /etc/shadow leak through the export) or at itself (a loop). The policy, shared by every format
// with a backing file:
//  - the name resolves against the overlay's directory, symlinks followed, and must land inside
//    an allowed root (default: the top image's own directory tree; --allow-backing adds roots);
//  - a chain that revisits an image, or is deeper than BACKING_MAX_DEPTH, is refused;
//  - the format recorded in the image wins; without one the file is probed by magic only,
//    always opened read-only, and a recorded "raw" is never probed (so never promoted).

import { dirname, isAbsolute, relative, resolve, sep } from 'node:path';
import { canonicalPath } from '../io/realpath.js';
import { UnsupportedImageError } from '../errors.js';

/** Backing chains deeper than this are refused; QEMU has no fixed limit but loops must end. */
export const BACKING_MAX_DEPTH = 64;

export class BackingPolicyError extends UnsupportedImageError {}

export interface BackingPolicy {
  /**
   * Roots a backing file may live in (files or directories). Fixed at the top of the chain and
   * passed down unchanged, so a chain never climbs out of what the user allowed.
   */
  readonly allowedRoots: readonly string[] | 'any';
  /** Real paths of the images already in this chain, top first. */
  readonly chain: readonly string[];
}

/**
 * The policy for the top image at `imagePath`: `allow` is the open option (`false` refuses any
 * backing file, an array adds roots to the image's own directory, `true` allows anything).
 */
export async function topBackingPolicy(imagePath: string, allow: unknown): Promise<BackingPolicy | false> {
  if (allow === false) return false;
  if (allow === true) return { allowedRoots: 'any', chain: [await real(imagePath)] };
  const extra = Array.isArray(allow) ? allow.filter((d): d is string => typeof d === 'string') : [];
  // The directory the user named the image in (relative backing names resolve against it too).
  const roots = [await real(dirname(resolve(imagePath))), ...(await Promise.all(extra.map(real)))];
  return { allowedRoots: roots, chain: [await real(imagePath)] };
}

function inside(root: string, path: string): boolean {
  const rel = relative(root, path);
  return rel === '' || (rel !== '..' && !rel.startsWith(`..${sep}`) && !isAbsolute(rel));
}

async function real(path: string): Promise<string> {
  try {
    return await canonicalPath(path);
  } catch {
    return resolve(path);
  }
}

export interface ResolvedBacking {
  /** Absolute, symlink-free path to open. */
  readonly path: string;
  /** The policy for opening that image's own backing file. */
  readonly next: BackingPolicy;
}

/**
 * Resolve backing name `backingName` of the image at `overlayPath` under `policy`, or throw a
 * BackingPolicyError that says how to allow it. `what` names the reference in messages.
 */
export async function resolveBacking(overlayPath: string, backingName: string, policy: BackingPolicy, what = 'backing file'): Promise<ResolvedBacking> {
  if (backingName === '') throw new BackingPolicyError(`${overlayPath}: empty ${what} name`);
  const base = dirname(resolve(overlayPath));
  const target = await real(isAbsolute(backingName) ? backingName : resolve(base, backingName));
  const { chain, allowedRoots } = policy;
  if (chain.includes(target)) {
    throw new BackingPolicyError(`${overlayPath}: ${what} ${JSON.stringify(backingName)} loops back to ${target}, which is already in the backing chain`);
  }
  if (chain.length > BACKING_MAX_DEPTH) {
    throw new BackingPolicyError(`${overlayPath}: backing chain deeper than ${BACKING_MAX_DEPTH} images`);
  }
  if (allowedRoots !== 'any' && !allowedRoots.some((r) => inside(r, target))) {
    throw new BackingPolicyError(
      `${overlayPath}: ${what} ${JSON.stringify(backingName)} resolves to ${target}, outside the allowed directories ` +
        `(${allowedRoots.join(', ')}); if you trust this image, pass --allow-backing ${dirname(target)}`,
    );
  }
  return { path: target, next: { allowedRoots, chain: [...chain, target] } };
}

/**
 * The format to open a backing file with: the recorded one when the image names it, else what
 * its magic says. Probing never yields a writable open (callers open backing files read-only)
 * and a recorded 'raw' is taken as is, so a raw image is never promoted to another format.
 */
export function backingFormatFor(recorded: string | null | undefined): string | undefined {
  return recorded === null || recorded === undefined || recorded === '' ? undefined : recorded;
}
