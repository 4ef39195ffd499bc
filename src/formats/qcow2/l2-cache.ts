// An LRU cache of one-cluster metadata tables (L2 tables, refcount blocks), keyed by host offset.
// Write-through (every change written by `write()`) or write-back (changes stay dirty in memory
// until `writeDirty()`, which the driver calls in dependency order). Dirty tables are never
// evicted, so the owner bounds the cache by writing back when `dirtyCount()` grows; a load never
// resurrects a copy older than a write that overlapped it.

export type TableLoader = (hostOffset: number) => Promise<Buffer>;
export type TableWriter = (hostOffset: number, table: Buffer) => Promise<void>;

export class TableCache {
  private readonly tables = new Map<number, Buffer>();
  /** The table getNow() made most recent last (-1: none, or another since). */
  private lastHit = -1;
  private readonly loading = new Map<number, Promise<Buffer>>();
  /** Bumped on every write, so a load that raced a write is retried instead of cached. */
  private readonly generation = new Map<number, number>();
  private readonly writing = new Map<number, Promise<void>>();
  /** Byte ranges changed since the last writeback; a new object on every change. */
  private readonly dirty = new Map<number, { start: number; end: number }>();
  readonly capacity: number;
  /** Changes stay in memory until writeDirty() instead of being written by write(). */
  writeBack = false;

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
      this.lastHit = -1;
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

  /** get() when the table is cached, here and now; undefined when it would have to be loaded. */
  getNow(hostOffset: number): Buffer | undefined {
    const hit = this.tables.get(hostOffset);
    // Walks ask for one table many times in a row: it is the most recent already.
    if (hit !== undefined && hostOffset !== this.lastHit) {
      this.tables.delete(hostOffset);
      this.tables.set(hostOffset, hit);
      this.lastHit = hostOffset;
    }
    return hit;
  }

  /** The table at `hostOffset` if it is cached (recency unchanged), without loading it. */
  peek(hostOffset: number): Buffer | undefined {
    return this.tables.get(hostOffset);
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

  /** Cache `table` as the content at `hostOffset`; write it through unless in write-back mode. */
  async write(hostOffset: number, table: Buffer, range?: { start: number; end: number }): Promise<void> {
    this.generation.set(hostOffset, (this.generation.get(hostOffset) ?? 0) + 1);
    if (this.writeBack) {
      const r = range ?? { start: 0, end: table.length };
      const d = this.dirty.get(hostOffset);
      this.dirty.set(hostOffset, d ? { start: Math.min(d.start, r.start), end: Math.max(d.end, r.end) } : { start: r.start, end: r.end });
      this.insert(hostOffset, table);
      return;
    }
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

  /** Tables changed in memory and not yet written. */
  dirtyCount(): number {
    return this.dirty.size;
  }

  /** Write every dirty table (concurrently; the caller orders and flushes around it). */
  async writeDirty(): Promise<void> {
    const batch = [...this.dirty];
    await Promise.all(
      batch.map(async ([off, r]) => {
        const table = this.tables.get(off);
        if (table !== undefined && r.end > r.start) await this.store(off + r.start, table.subarray(r.start, r.end));
        // Clean only if nothing changed it meanwhile; until then it cannot be evicted and reloaded stale.
        if (this.dirty.get(off) === r) this.dirty.delete(off);
      }),
    );
  }

  private insert(hostOffset: number, table: Buffer): void {
    this.lastHit = -1;
    this.tables.delete(hostOffset);
    this.tables.set(hostOffset, table);
    if (this.tables.size <= this.capacity) return;
    for (const off of this.tables.keys()) {
      if (this.tables.size <= this.capacity) break;
      if (!this.dirty.has(off)) this.tables.delete(off);
    }
  }

  /** Forget a table whose cluster was freed (it may be reused for data); its changes are dropped. */
  evict(hostOffset: number): void {
    this.tables.delete(hostOffset);
    this.dirty.delete(hostOffset);
    this.generation.set(hostOffset, (this.generation.get(hostOffset) ?? 0) + 1);
  }
}
