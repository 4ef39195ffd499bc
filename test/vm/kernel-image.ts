// Turns Debian's compressed bzImage into the uncompressed ELF vmlinux that qemu boots
// directly through the PVH entry point: under TCG, the kernel decompressing itself costs
// seconds on every boot, so it is done once on the host and cached.

import { execFileSync } from 'node:child_process';

const XZ_MAGIC = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);
const ZSTD_MAGIC = Buffer.from([0x28, 0xb5, 0x2f, 0xfd]);
const ELF_MAGIC = Buffer.from([0x7f, 0x45, 0x4c, 0x46]);

function tryDecompress(tool: string, args: string[], input: Buffer): Buffer | null {
  try {
    const out = execFileSync(tool, args, { input, maxBuffer: 512 * 1024 * 1024, stdio: ['pipe', 'pipe', 'ignore'] });
    return out.subarray(0, 4).equals(ELF_MAGIC) ? out : null;
  } catch (err) {
    // Trailing bytes after the stream make some decompressors exit non-zero after writing
    // the whole kernel; keep the output when it is a complete ELF image.
    const out = (err as { stdout?: Buffer }).stdout;
    return out && out.length > 4 && out.subarray(0, 4).equals(ELF_MAGIC) ? out : null;
  }
}

/**
 * Return the ELF kernel embedded in `bzImage`, or null when no stream decompresses to one
 * (the caller then boots the bzImage itself, only slower).
 */
export function extractVmlinux(bzImage: Buffer): Buffer | null {
  for (let at = bzImage.indexOf(XZ_MAGIC); at >= 0; at = bzImage.indexOf(XZ_MAGIC, at + 1)) {
    const out = tryDecompress('xz', ['-dc', '--single-stream'], bzImage.subarray(at));
    if (out) return out;
  }
  for (let at = bzImage.indexOf(ZSTD_MAGIC); at >= 0; at = bzImage.indexOf(ZSTD_MAGIC, at + 1)) {
    const out = tryDecompress('zstd', ['-dc'], bzImage.subarray(at));
    if (out) return out;
  }
  return null;
}
