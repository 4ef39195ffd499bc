// Who copies a request's data: the event loop, reading it into a buffer (the write then copies
// from memory the CPU has just touched), or the thread that writes it, straight from the
// source's page cache (mapped-source.ts: one copy fewer, but from memory no core has cached,
// which costs the writer about a quarter more per byte).
//
// The loop's share is every byte read, zeros included (it must look at them); the writer's is
// the bytes that are not zeros. While most of what is read gets written, the writer is the
// slower side, and the loop copies for it; once a fifth or more of it turns out to be zeros,
// the loop is, and the writer takes its data from the mapping. Cached 1 GiB copies on 2 cores,
// best of 12-16, runs alternating between the two:
//   qcow2 -> raw, nothing read is zeros:         read 190 ms, mapped 211 ms
//   raw -> qcow2, data only (holes skipped):     read 185 ms, mapped 199 ms
//   raw -> qcow2, a third of what is read zeros: read 274 ms, mapped 205 ms
//   raw -> raw, the same image:                  read 238 ms, mapped 210 ms

/** Written bytes per byte read below which the writer's data comes from the mapping. */
const MAP_BELOW_WRITTEN_SHARE = 0.8;

export type MapPolicy = 'balance' | 'always' | 'never';

export interface CopyProgress {
  /** Bytes of data read (or mapped) so far, zeros included. */
  readonly readBytes: number;
  /** Of those, bytes written: not zeros. */
  readonly writtenBytes: number;
}

/** Map the next request's source (true) or read it (false), given the copy so far. */
export function mapNext(policy: MapPolicy, sofar: CopyProgress): boolean {
  if (policy !== 'balance') return policy === 'always';
  return sofar.writtenBytes < MAP_BELOW_WRITTEN_SHARE * sofar.readBytes;
}
