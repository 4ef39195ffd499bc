// Where a backing file named inside an image may be opened from. The name is untrusted image
// data: "The backing filename may be an absolute path or relative to the image file"
// (qed_spec.rst), so an image could otherwise point at any file on the host. It is resolved
// against the image's directory, symlinks followed, and must land inside an allowed directory
// (default: the image's own directory tree).

import { realpath } from 'node:fs/promises';
import { dirname, isAbsolute, relative, resolve, sep } from 'node:path';
import { UnsupportedImageError } from '../../errors.js';

function inside(dir: string, path: string): boolean {
  const rel = relative(dir, path);
  return rel === '' || (!rel.startsWith(`..${sep}`) && rel !== '..' && !isAbsolute(rel));
}

async function real(path: string): Promise<string> {
  try {
    return await realpath(path);
  } catch {
    return resolve(path);
  }
}

/**
 * The path to open for backing name `name` of the image at `imagePath`, or an
 * UnsupportedImageError when it lies outside every directory of `allowedDirs`
 * (undefined: the image's own directory).
 */
export async function resolveBackingPath(format: string, imagePath: string, name: string, allowedDirs?: readonly string[]): Promise<string> {
  const imageDir = resolve(dirname(imagePath));
  const path = isAbsolute(name) ? name : resolve(imageDir, name);
  const target = await real(path);
  const dirs = allowedDirs ?? [imageDir];
  for (const d of dirs) {
    if (inside(await real(d), target)) return target;
  }
  throw new UnsupportedImageError(`${format}: backing file ${JSON.stringify(name)} of ${imagePath} resolves to ${target}, outside the allowed directories (${dirs.join(', ')})`);
}
