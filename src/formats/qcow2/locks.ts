// Serialisation for the qcow2 driver: a mutex for metadata updates and a FIFO range lock over
// guest clusters, so requests touching the same cluster run one at a time (writers exclusive,
// readers shared) while requests on different clusters proceed concurrently.

export class Mutex {
  private tail: Promise<void> = Promise.resolve();

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => (release = r));
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

interface Holder {
  readonly first: number;
  readonly last: number;
  readonly exclusive: boolean;
  granted: boolean;
  wake: (() => void) | null;
}

export class RangeLock {
  /** Granted and waiting holders in arrival order; a waiter never overtakes a conflicting earlier one. */
  private readonly queue: Holder[] = [];

  async run<T>(first: number, last: number, exclusive: boolean, fn: () => Promise<T>): Promise<T> {
    const h: Holder = { first, last, exclusive, granted: false, wake: null };
    this.queue.push(h);
    if (!this.grantable(h)) await new Promise<void>((r) => (h.wake = r));
    h.granted = true;
    try {
      return await fn();
    } finally {
      this.queue.splice(this.queue.indexOf(h), 1);
      for (const w of this.queue) {
        if (!w.granted && w.wake && this.grantable(w)) {
          const wake = w.wake;
          w.wake = null;
          w.granted = true;
          wake();
        }
      }
    }
  }

  private grantable(h: Holder): boolean {
    for (const o of this.queue) {
      if (o === h) return true;
      if (o.first <= h.last && h.first <= o.last && (o.exclusive || h.exclusive)) return false;
    }
    return true;
  }
}
