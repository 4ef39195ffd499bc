// The body of one compression thread: compresses batches of qcow2 clusters with raw deflate
// (window bits 12, as QEMU) or zstd (level 3, QEMU's default), synchronously, because this
// thread does nothing else. Batches arrive and leave as transferred buffers.

import { parentPort } from 'node:worker_threads';
import { deflateRawSync, constants as zc } from 'node:zlib';
import { initZstd, zstdCompressSync } from '../formats/qcow2/compress.js';
import type { CompressRequest, CompressReply } from './compress-pool.js';

parentPort?.on('message', (req: CompressRequest) => {
  void (async () => {
    try {
      if (req.type === 1) await initZstd();
      const input = Buffer.from(req.data);
      const packed: Uint8Array[] = [];
      const lengths: number[] = [];
      let total = 0;
      for (let pos = 0; pos < input.length; pos += req.clusterBytes) {
        const c = input.subarray(pos, pos + req.clusterBytes);
        const out = req.type === 0 ? deflateRawSync(c, { windowBits: 12, level: zc.Z_DEFAULT_COMPRESSION }) : zstdCompressSync(c);
        if (out.length < c.length) {
          packed.push(out);
          lengths.push(out.length);
          total += out.length;
        } else {
          lengths.push(-1);
        }
      }
      const data = new ArrayBuffer(total);
      const view = new Uint8Array(data);
      let at = 0;
      for (const p of packed) {
        view.set(p, at);
        at += p.length;
      }
      const reply: CompressReply = { id: req.id, data, lengths };
      parentPort!.postMessage(reply, [data]);
    } catch (err) {
      const reply: CompressReply = { id: req.id, data: new ArrayBuffer(0), lengths: [], error: err instanceof Error ? err.message : String(err) };
      parentPort!.postMessage(reply);
    }
  })();
});
