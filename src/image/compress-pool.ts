// A pool of worker threads compressing qcow2 clusters. Compression is CPU-bound and zstd (a
// WebAssembly build) runs on the calling thread, so convert -c hands batches of clusters to
// one thread per core and keeps the event loop for I/O.

import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { ImgbdError } from '../errors.js';

export interface CompressRequest {
  readonly id: number;
  /** 0 zlib (raw deflate), 1 zstd: qcow2's compression_type. */
  readonly type: 0 | 1;
  /** The clusters back to back, `clusterBytes` each; transferred, not copied. */
  readonly data: ArrayBuffer;
  readonly clusterBytes: number;
}

export interface CompressReply {
  readonly id: number;
  /** The compressed clusters back to back; transferred. */
  readonly data: ArrayBuffer;
  /** One per cluster: its compressed length, or -1 when compression would not make it smaller. */
  readonly lengths: number[];
  readonly error?: string;
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

/**
 * The worker runs from the same tree as this module: .js once built; under tsx (tests, running
 * from source) the loader does not reach worker threads, so the worker registers it first.
 */
function startWorker(): Worker {
  if (!import.meta.url.endsWith('.ts')) return new Worker(new URL('./compress-worker.js', import.meta.url));
  const api = import.meta.resolve('tsx/esm/api');
  const body = new URL('./compress-worker.ts', import.meta.url).href;
  return new Worker(`import(${JSON.stringify(api)}).then((m) => { m.register(); return import(${JSON.stringify(body)}); });`, { eval: true });
}

export class CompressPool {
  private readonly slots: Slot[] = [];
  private readonly pending = new Map<number, { resolve: (r: (Buffer | null)[]) => void; reject: (e: Error) => void; slot: Slot }>();
  private nextId = 1;

  constructor(threads = availableParallelism()) {
    for (let i = 0; i < Math.max(1, threads); i++) {
      const slot: Slot = { worker: startWorker(), busy: 0 };
      slot.worker.on('message', (r: CompressReply) => this.settle(r));
      slot.worker.on('error', (err) => this.failAll(slot, err));
      this.slots.push(slot);
    }
  }

  get threads(): number {
    return this.slots.length;
  }

  /** Compress each cluster (all `clusterBytes` long); null for those that do not shrink. */
  compress(type: 0 | 1, clusters: readonly Buffer[], clusterBytes: number): Promise<(Buffer | null)[]> {
    const slot = this.slots.reduce((a, b) => (b.busy < a.busy ? b : a));
    const id = this.nextId++;
    slot.busy++;
    // One copy into a fresh buffer that moves to the thread: nothing is cloned on the way.
    const data = new ArrayBuffer(clusters.length * clusterBytes);
    const view = new Uint8Array(data);
    clusters.forEach((c, i) => view.set(c, i * clusterBytes));
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, slot });
      const req: CompressRequest = { id, type, data, clusterBytes };
      slot.worker.postMessage(req, [data]);
    });
  }

  private settle(r: CompressReply): void {
    const p = this.pending.get(r.id);
    if (!p) return;
    this.pending.delete(r.id);
    p.slot.busy--;
    if (r.error !== undefined) {
      p.reject(new CompressError(`compression failed: ${r.error}`));
      return;
    }
    const out: (Buffer | null)[] = [];
    let pos = 0;
    for (const n of r.lengths) {
      if (n < 0 || pos + n > r.data.byteLength) {
        out.push(null);
        continue;
      }
      out.push(Buffer.from(r.data, pos, n));
      pos += n;
    }
    p.resolve(out);
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
