// The body of one compression thread: compresses batches of qcow2 clusters with raw deflate
// (window bits 12, as QEMU) or zstd (level 3, QEMU's default), synchronously, because this
// thread does nothing else. Clusters are read from, and compressed into, shared memory.

import { parentPort } from 'node:worker_threads';
import { compressClusterInto, initZstd } from '../formats/qcow2/compress.js';
import type { CompressRequest, CompressReply } from './compress-pool.js';

parentPort?.on('message', (req: CompressRequest) => {
  void (async () => {
    try {
      if (req.type === 1) await initZstd();
      const out = Buffer.from(req.output, req.outputOffset, req.outputBytes);
      const lengths: number[] = [];
      let pos = 0;
      for (const [offset, length] of req.clusters) {
        let cluster: Buffer = Buffer.from(req.input, offset, length);
        // The image's short last cluster is compressed whole, padded with zeros, as the driver would.
        if (length < req.clusterBytes) {
          const padded = Buffer.alloc(req.clusterBytes);
          cluster.copy(padded);
          cluster = padded;
        }
        // Only a result that saves space is kept: room for one byte less than the cluster.
        const n = compressClusterInto(req.type, cluster, out.subarray(pos, Math.min(out.length, pos + req.clusterBytes - 1)));
        lengths.push(n);
        if (n > 0) pos += n;
      }
      const reply: CompressReply = { id: req.id, lengths };
      parentPort!.postMessage(reply);
    } catch (err) {
      const reply: CompressReply = { id: req.id, lengths: [], error: err instanceof Error ? err.message : String(err) };
      parentPort!.postMessage(reply);
    }
  })();
});
