// Shared fixtures for the toolbox interop tests: a source image of mixed content (random data,
// text-like compressible data, written zeros and holes) and thin qemu-img wrappers.

import { closeSync, openSync, writeSync, ftruncateSync } from 'node:fs';
import { runOk, run } from '../helpers/peers.js';

export const MiB = 1024 * 1024;

function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * A raw image of `sizeMiB` MiB: per MiB, by a seeded pattern, random bytes, text, written
 * zeros, a hole, or a mix inside the MiB (so zero detection works below the request size).
 */
export function writeMixedRaw(path: string, sizeMiB: number, seed = 1): void {
  const rand = prng(seed);
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, sizeMiB * MiB);
    const words = ['lorem', 'ipsum', 'block', 'device', 'qcow2', 'cluster', 'sector', '\n'];
    for (let m = 0; m < sizeMiB; m++) {
      const kind = m % 5;
      const buf = Buffer.alloc(MiB);
      if (kind === 0) for (let i = 0; i < MiB; i += 4) buf.writeUInt32LE((rand() * 2 ** 32) >>> 0, i);
      else if (kind === 1) {
        let p = 0;
        while (p < MiB) p += buf.write(`${words[(rand() * words.length) | 0]!} `, p);
      } else if (kind === 2) {
        // written zeros: allocated in the file, data to the allocation map
      } else if (kind === 3) continue;
      else for (let i = 0; i < MiB; i += 65536) if (rand() < 0.5) buf.fill((rand() * 255 + 1) | 0, i, i + 4096);
      writeSync(fd, buf, 0, MiB, m * MiB);
    }
    // A short tail: the size is not a multiple of any cluster size.
    ftruncateSync(fd, sizeMiB * MiB + 12_288);
    writeSync(fd, Buffer.from('tail!'), 0, 5, sizeMiB * MiB + 10_000);
  } finally {
    closeSync(fd);
  }
}

export async function qemuCompare(a: string, fa: string, b: string, fb: string): Promise<{ code: number | null; stdout: string }> {
  const r = await run('qemu-img', ['compare', '-f', fa, '-F', fb, a, b]);
  return { code: r.code, stdout: r.stdout + r.stderr };
}

export async function qemuCheckClean(path: string, format: string): Promise<void> {
  if (format === 'raw') return;
  await runOk('qemu-img', ['check', '-f', format, path]);
}

export interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}

export async function qemuMapJson(path: string, format: string): Promise<QemuMapEntry[]> {
  return JSON.parse(await runOk('qemu-img', ['map', '--output=json', '-f', format, path])) as QemuMapEntry[];
}
