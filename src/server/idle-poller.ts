// Busy-polling the clients' sockets for a moment when the server runs out of work.
//
// A client at queue depth 1 sends its next request a few tens of microseconds after it gets our
// reply. Sleeping in epoll through that gap costs a context switch on each side and, in a virtual
// machine, an interrupt to wake an idle vCPU; polling the sockets instead takes the wake-up off the
// round trip. QEMU's iothreads do the same (adaptive polling, poll-max-ns). Polling only pays while
// clients answer quickly, so like QEMU we stop as soon as a pause outlasts the budget, and start
// again only after a pause shorter than it: a quiet server polls for one budget, then sleeps.
//
// The poll blocks the event loop, so it only starts when only the clients can move things on (no
// request being answered, no reply queued; a write whose payload is still on its way waits for its
// client like an idle connection: a sender refills the socket soon after we drain it) and every
// client's socket can be watched; it ends the moment any of them has bytes (or EOF), and the event
// loop then finds them without sleeping. It costs CPU, so it is the caller's choice: `imgbd serve`
// polls unless told not to, an attach supervisor does not.

import { availableParallelism } from 'node:os';
import { UsageError } from '../errors.js';
import { pollReadableNow, type PollSet } from '../sys/socket.js';

/** poll.h */
const POLLIN = 0x1;

/** What the poller needs of a connection. */
export interface PollSource {
  /** Only the client can move things on: nothing in flight but a payload still arriving, no reply waiting, nothing buffered. */
  readonly idle: boolean;
  /** The socket descriptor to watch, or -1 when it cannot be (TLS, handshake): then nobody polls. */
  readonly pollFd: number;
}

/**
 * The budget for a server whose clients are programs on this machine or across a fast network:
 * they usually answer a reply within 15-30 microseconds. Zero with one CPU, where the client
 * cannot run while we poll for it.
 */
export function defaultPollMaxUs(): number {
  return availableParallelism() > 1 ? 50 : 0;
}

/** Longer, and the event loop would hold every other client up for one that is not coming. */
export const MAX_POLL_US = 1000;

/** `us` if it is a budget the poller takes (0 to MAX_POLL_US whole microseconds). */
export function checkPollMaxUs(us: number): number {
  if (!Number.isInteger(us) || us < 0 || us > MAX_POLL_US) throw new UsageError(`--poll-max-us must be between 0 and ${MAX_POLL_US} microseconds, not ${us}`);
  return us;
}

export class IdlePoller {
  private readonly budgetMs: number;
  private readonly sources: () => Iterable<PollSource>;
  private scheduled = false;
  /** When the server last ran out of work without polling (performance.now()), or -1. */
  private sleptAt = -1;
  /** The last pause was short enough for polling to pay. */
  private worthIt = true;
  private readonly set: PollSet = { fds: Buffer.alloc(0), count: 0 };
  /** Polls started, and those a socket ended before the budget ran out. */
  readonly counts = { polls: 0, found: 0 };

  /** `maxUs` 0 turns polling off. */
  constructor(maxUs: number, sources: () => Iterable<PollSource>) {
    this.budgetMs = maxUs / 1000;
    this.sources = sources;
  }

  /**
   * A connection did some work this turn of the event loop (read a request, finished one). The
   * check runs once per turn, after the turn's replies have been written (a batch of them leaves
   * in the check phase too, queued before the check).
   */
  activity(): void {
    if (this.budgetMs <= 0) return;
    if (this.sleptAt >= 0) {
      this.worthIt = performance.now() - this.sleptAt <= this.budgetMs;
      this.sleptAt = -1;
    }
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(this.check);
  }

  private readonly check = (): void => {
    this.scheduled = false;
    if (!this.collect()) return;
    if (!this.worthIt) {
      this.sleptAt = performance.now();
      return;
    }
    this.counts.polls++;
    const end = performance.now() + this.budgetMs;
    while (pollReadableNow(this.set) === 0) {
      if (performance.now() >= end) {
        this.worthIt = false;
        return;
      }
    }
    this.counts.found++;
  };

  /** Gather every socket to watch; false when some connection is busy or cannot be watched. */
  private collect(): boolean {
    let n = 0;
    for (const s of this.sources()) {
      if (!s.idle || s.pollFd < 0) return false;
      if (this.set.fds.length < (n + 1) * 8) {
        const grown = Buffer.alloc((n + 4) * 8);
        this.set.fds.copy(grown);
        this.set.fds = grown;
      }
      this.set.fds.writeInt32LE(s.pollFd, n * 8);
      this.set.fds.writeInt16LE(POLLIN, n * 8 + 4);
      this.set.fds.writeInt16LE(0, n * 8 + 6);
      n++;
    }
    this.set.count = n;
    return n > 0;
  }
}
