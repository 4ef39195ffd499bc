// realpath(3) for the paths imgbd checks before it opens an image. node:fs/promises has one
// too, but loading that module on the way to the first read costs a command ~3 ms: node
// compiles it, with the stream and readline modules its file handles need, on every start.
import { realpath } from 'node:fs';
import { promisify } from 'node:util';

export const canonicalPath: (path: string) => Promise<string> = promisify(realpath.native);
