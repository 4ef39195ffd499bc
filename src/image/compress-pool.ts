// A pool of worker threads compressing qcow2 clusters. Compression is CPU-bound, so convert -c
// hands batches of clusters to one thread per core and keeps the event loop for I/O. Clusters
// are read where the caller read them and compressed straight into the caller's output area,
// both shared memory: a batch crosses threads as a few numbers, with no copy and no allocation.

import { availableParallelism } from 'node:os';
import type { Worker } from 'node:worker_threads';
import { ImgbdError } from '../errors.js';
import { siblingModule, startWorker } from '../util/start-worker.js';

export interface CompressRequest {
  readonly id: number;
  /** 0 zlib (raw deflate), 1 zstd: qcow2's compression_type. */
  readonly type: 0 | 1;
  readonly input: SharedArrayBuffer;
  /** [offset, length] in `input` per cluster; a length short of clusterBytes is the image's last cluster. */
  readonly clusters: readonly (readonly [number, number])[];
  readonly clusterBytes: number;
  /** Where the compressed clusters go, back to back from `outputOffset`. */
  readonly output: SharedArrayBuffer;
  readonly outputOffset: number;
  readonly outputBytes: number;
}

export interface CompressReply {
  readonly id: number;
  /** One per cluster: its compressed length, or -1 when compression would not make it smaller. */
  readonly lengths: number[];
  readonly error?: string;
}

/** A Buffer over shared memory, for batches handed to the pool. */
export function sharedBuffer(bytes: number): Buffer {
  return Buffer.from(new SharedArrayBuffer(bytes));
}

export class CompressError extends ImgbdError {
  constructor(message: string) {
    super('ERR_COMPRESS', message);
  }
}

interface Slot {
  readonly worker: Worker;
  busy: number;
}

export class CompressPool {
  private readonly slots: Slot[] = [];
  private readonly pending = new Map<number, { resolve: (lengths: readonly number[]) => void; reject: (e: Error) => void; slot: Slot }>();
  private nextId = 1;

  constructor(threads = availableParallelism()) {
    for (let i = 0; i < Math.max(1, threads); i++) {
      const slot: Slot = { worker: startWorker(siblingModule('compress-worker', import.meta.url)), busy: 0 };
      slot.worker.on('message', (r: CompressReply) => this.settle(r));
      slot.worker.on('error', (err) => this.failAll(slot, err));
      this.slots.push(slot);
    }
  }

  get threads(): number {
    return this.slots.length;
  }

  /**
   * Compress each cluster (views of shared memory, `clusterBytes` long but for the image's last)
   * into `output` (shared memory, at least as long as the clusters together); null for those
   * that do not shrink. The results are views of `output`, valid until it is reused.
   */
  compress(type: 0 | 1, clusters: readonly Buffer[], clusterBytes: number, output: Buffer): Promise<(Buffer | null)[]> {
    const input = clusters[0]?.buffer;
    if (input === undefined) return Promise.resolve([]);
    if (!(input instanceof SharedArrayBuffer) || !(output.buffer instanceof SharedArrayBuffer) || clusters.some((c) => c.buffer !== input)) {
      return Promise.reject(new CompressError('compression batches must be views of one shared buffer'));
    }
    const slot = this.slots.reduce((a, b) => (b.busy < a.busy ? b : a));
    const id = this.nextId++;
    slot.busy++;
    const out = output.buffer;
    return new Promise((resolve, reject) => {
      this.pending.set(id, {
        resolve: (lengths) => {
          const views: (Buffer | null)[] = [];
          let pos = output.byteOffset;
          for (const n of lengths) {
            if (n < 0 || pos + n > output.byteOffset + output.length) {
              views.push(null);
              continue;
            }
            views.push(Buffer.from(out, pos, n));
            pos += n;
          }
          resolve(views);
        },
        reject,
        slot,
      });
      const req: CompressRequest = {
        id,
        type,
        input,
        clusters: clusters.map((c) => [c.byteOffset, c.length] as const),
        clusterBytes,
        output: out,
        outputOffset: output.byteOffset,
        outputBytes: output.length,
      };
      slot.worker.postMessage(req);
    });
  }

  private settle(r: CompressReply): void {
    const p = this.pending.get(r.id);
    if (!p) return;
    this.pending.delete(r.id);
    p.slot.busy--;
    if (r.error !== undefined) p.reject(new CompressError(`compression failed: ${r.error}`));
    else p.resolve(r.lengths);
  }

  private failAll(slot: Slot, err: Error): void {
    for (const [id, p] of this.pending) {
      if (p.slot !== slot) continue;
      this.pending.delete(id);
      p.reject(new CompressError(`compression thread failed: ${err.message}`));
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
  }
}
