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
  /** Holders not yet granted: while there are none, a release has nobody to wake. */
  private waiting = 0;

  async run<T>(first: number, last: number, exclusive: boolean, fn: () => Promise<T>): Promise<T> {
    const h: Holder = { first, last, exclusive, granted: false, wake: null };
    this.queue.push(h);
    if (!this.grantable(h)) {
      this.waiting++;
      await new Promise<void>((r) => (h.wake = r));
    }
    h.granted = true;
    try {
      return await fn();
    } finally {
      this.queue.splice(this.queue.indexOf(h), 1);
      if (this.waiting > 0) this.wakeGrantable();
    }
  }

  /** Nobody holds or waits for any of clusters [first, last]. */
  idle(first: number, last: number): boolean {
    for (const o of this.queue) if (o.first <= last && first <= o.last) return false;
    return true;
  }

  private wakeGrantable(): void {
    for (const w of this.queue) {
      if (!w.granted && w.wake && this.grantable(w)) {
        const wake = w.wake;
        w.wake = null;
        w.granted = true;
        this.waiting--;
        wake();
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

/**
 * Group commit for fdatasync: callers that ask while a sync is running share the next one,
 * which starts after it (the running one may predate their writes). Concurrent allocating
 * writes then pay for one sync instead of one each.
 */
export class SyncBatcher {
  private running: Promise<void> | null = null;
  private next: Promise<void> | null = null;

  constructor(private readonly doSync: () => Promise<void>) {}

  sync(): Promise<void> {
    if (this.running === null) return this.start();
    if (this.next === null) {
      this.next = this.running
        .catch(() => undefined)
        .then(() => {
          this.next = null;
          return this.start();
        });
    }
    return this.next;
  }

  private start(): Promise<void> {
    const p: Promise<void> = this.doSync().finally(() => {
      if (this.running === p) this.running = null;
    });
    this.running = p;
    return p;
  }
}
