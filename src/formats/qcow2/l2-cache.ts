// An LRU cache of one-cluster metadata tables (L2 tables, refcount blocks), keyed by host offset.
// Write-through: every change is written to disk by `write()`, in the order crash safety needs,
// and a load never resurrects a copy older than a write that overlapped it.

export type TableLoader = (hostOffset: number) => Promise<Buffer>;
export type TableWriter = (hostOffset: number, table: Buffer) => Promise<void>;

export class TableCache {
  private readonly tables = new Map<number, Buffer>();
  private readonly loading = new Map<number, Promise<Buffer>>();
  /** Bumped on every write, so a load that raced a write is retried instead of cached. */
  private readonly generation = new Map<number, number>();
  private readonly writing = new Map<number, Promise<void>>();
  private readonly capacity: number;

  /** `capacityTables` tables of one cluster each stay cached (at least 2). */
  constructor(
    capacityTables: number,
    private readonly load: TableLoader,
    private readonly store: TableWriter,
  ) {
    this.capacity = Math.max(2, Math.floor(capacityTables));
  }

  /** The table at `hostOffset`; the returned buffer is shared, change it only through `write`. */
  get(hostOffset: number): Promise<Buffer> {
    const hit = this.tables.get(hostOffset);
    if (hit !== undefined) {
      // Re-insert to mark most recently used; Map keeps insertion order.
      this.tables.delete(hostOffset);
      this.tables.set(hostOffset, hit);
      return Promise.resolve(hit);
    }
    let p = this.loading.get(hostOffset);
    if (p === undefined) {
      p = this.loadFresh(hostOffset).finally(() => this.loading.delete(hostOffset));
      this.loading.set(hostOffset, p);
    }
    return p;
  }

  private async loadFresh(hostOffset: number): Promise<Buffer> {
    for (;;) {
      await this.writing.get(hostOffset);
      const gen = this.generation.get(hostOffset) ?? 0;
      const buf = await this.load(hostOffset);
      const cached = this.tables.get(hostOffset);
      if (cached !== undefined) return cached;
      if ((this.generation.get(hostOffset) ?? 0) === gen && !this.writing.has(hostOffset)) {
        this.insert(hostOffset, buf);
        return buf;
      }
    }
  }

  /** Cache `table` as the content at `hostOffset` and write it through. */
  async write(hostOffset: number, table: Buffer, range?: { start: number; end: number }): Promise<void> {
    this.generation.set(hostOffset, (this.generation.get(hostOffset) ?? 0) + 1);
    this.insert(hostOffset, table);
    const prev = this.writing.get(hostOffset) ?? Promise.resolve();
    const p = prev.then(() => (range ? this.store(hostOffset + range.start, table.subarray(range.start, range.end)) : this.store(hostOffset, table)));
    const done = p.then(
      () => undefined,
      () => undefined,
    );
    this.writing.set(hostOffset, done);
    void done.then(() => {
      if (this.writing.get(hostOffset) === done) this.writing.delete(hostOffset);
    });
    await p;
  }

  private insert(hostOffset: number, table: Buffer): void {
    this.tables.delete(hostOffset);
    this.tables.set(hostOffset, table);
    while (this.tables.size > this.capacity) {
      const oldest = this.tables.keys().next().value as number;
      this.tables.delete(oldest);
    }
  }

  /** Forget a table whose cluster was freed (it may be reused for data). */
  evict(hostOffset: number): void {
    this.tables.delete(hostOffset);
    this.generation.set(hostOffset, (this.generation.get(hostOffset) ?? 0) + 1);
  }
}
