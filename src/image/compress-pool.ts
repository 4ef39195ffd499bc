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
  readonly clusters: Uint8Array[];
}

export interface CompressReply {
  readonly id: number;
  /** One per cluster: the compressed bytes, or null when they would not be smaller. */
  readonly packed: (Uint8Array | null)[];
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

  /** Compress each cluster; null for those that do not shrink. */
  compress(type: 0 | 1, clusters: Buffer[]): Promise<(Buffer | null)[]> {
    const slot = this.slots.reduce((a, b) => (b.busy < a.busy ? b : a));
    const id = this.nextId++;
    slot.busy++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, slot });
      const req: CompressRequest = { id, type, clusters };
      slot.worker.postMessage(req);
    });
  }

  private settle(r: CompressReply): void {
    const p = this.pending.get(r.id);
    if (!p) return;
    this.pending.delete(r.id);
    p.slot.busy--;
    if (r.error !== undefined) p.reject(new CompressError(`compression failed: ${r.error}`));
    else p.resolve(r.packed.map((b) => (b === null ? null : Buffer.from(b.buffer, b.byteOffset, b.byteLength))));
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
