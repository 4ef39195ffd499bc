// Tracks which bytes of a structured read reply have arrived. "The data MUST lie within the
// bounds of the original offset and length of the client's request, and MUST NOT overlap
// with the bounds of any earlier content chunk or error chunk in the same reply."
// A successful reply must cover the request exactly, or the caller's buffer would keep
// stale bytes where the server sent nothing.

import { ProtocolError } from '../errors.js';

export class ReadCoverage {
  /** Disjoint, sorted, non-adjacent [start, end) ranges (adjacent ones are merged). */
  private readonly ranges: [number, number][] = [];
  private coveredBytes = 0;

  constructor(
    readonly offset: number,
    readonly length: number,
  ) {}

  get covered(): number {
    return this.coveredBytes;
  }

  get complete(): boolean {
    return this.coveredBytes === this.length;
  }

  /** Record [offset, offset+length) in absolute export offsets; throws on bounds or overlap. */
  add(offset: number, length: number, what: string): void {
    const end = offset + length;
    if (length <= 0 || offset < this.offset || end > this.offset + this.length) {
      throw new ProtocolError('ERR_NBD_PROTOCOL', `${what} [${offset}, ${end}) lies outside the request [${this.offset}, ${this.offset + this.length})`);
    }
    // First range whose end is beyond `offset`: the only candidate for an overlap.
    let lo = 0;
    let hi = this.ranges.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.ranges[mid]![1] <= offset) lo = mid + 1;
      else hi = mid;
    }
    const next = this.ranges[lo];
    if (next !== undefined && next[0] < end) {
      throw new ProtocolError('ERR_NBD_PROTOCOL', `${what} [${offset}, ${end}) overlaps data already received`);
    }
    const prev = lo > 0 ? this.ranges[lo - 1] : undefined;
    const joinPrev = prev !== undefined && prev[1] === offset;
    const joinNext = next !== undefined && next[0] === end;
    if (joinPrev && joinNext) {
      prev[1] = next[1];
      this.ranges.splice(lo, 1);
    } else if (joinPrev) {
      prev[1] = end;
    } else if (joinNext) {
      next[0] = offset;
    } else {
      this.ranges.splice(lo, 0, [offset, end]);
    }
    this.coveredBytes += length;
  }
}
