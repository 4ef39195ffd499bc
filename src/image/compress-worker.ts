// The body of one compression thread: compresses batches of qcow2 clusters with raw deflate
// (window bits 12, as QEMU) or zstd, synchronously, because this thread does nothing else.

import { parentPort } from 'node:worker_threads';
import { deflateRawSync, constants as zc } from 'node:zlib';
import * as zstd from '@bokuweb/zstd-wasm';
import type { CompressRequest, CompressReply } from './compress-pool.js';

let zstdReady: Promise<void> | null = null;

parentPort?.on('message', (req: CompressRequest) => {
  void (async () => {
    try {
      const out: (Uint8Array | null)[] = [];
      if (req.type === 1) {
        zstdReady ??= zstd.init();
        await zstdReady;
      }
      for (const c of req.clusters) {
        const packed = req.type === 0 ? deflateRawSync(c, { windowBits: 12, level: zc.Z_DEFAULT_COMPRESSION }) : zstd.compress(c, 3);
        out.push(packed.length < c.length ? packed : null);
      }
      const reply: CompressReply = { id: req.id, packed: out };
      parentPort!.postMessage(reply);
    } catch (err) {
      const reply: CompressReply = { id: req.id, packed: [], error: err instanceof Error ? err.message : String(err) };
      parentPort!.postMessage(reply);
    }
  })();
});
