// The idle poller (server/idle-poller.ts) over real socketpairs: it watches idle sockets until
// one has bytes or EOF, gives up for as long as clients pause longer than its budget, and never
// polls while some connection is busy or cannot be watched.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { setTimeout as sleep } from 'node:timers/promises';
import { IdlePoller, type PollSource } from '../../src/server/idle-poller.js';
import { closeFd, socketPair } from '../../src/sys/socket.js';

/** Let the poller's check (queued by activity()) run. */
const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** Run `fn` with a connected socketpair, closed afterwards. */
async function withSocketPair(fn: (ours: number, theirs: number) => Promise<void>): Promise<void> {
  const [ours, theirs] = socketPair();
  try {
    await fn(ours, theirs);
  } finally {
    closeFd(ours);
    closeFd(theirs);
  }
}

/**
 * A thread that writes one byte to `fd` `ms` after go() is called, while the main thread is busy
 * polling. go() returns when it was called, so the byte comes at least `ms` after that.
 */
async function writeLater(fd: number, ms: number): Promise<{ go(): number; done: Promise<unknown> }> {
  const flag = new Int32Array(new SharedArrayBuffer(4));
  const worker = new Worker(
    `const { workerData } = require('node:worker_threads');
     Atomics.wait(workerData.flag, 0, 0);
     Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, workerData.ms);
     require('node:fs').writeSync(workerData.fd, 'x');`,
    { eval: true, workerData: { fd, ms, flag } },
  );
  const done = new Promise((resolve) => worker.once('exit', resolve));
  await new Promise((resolve) => worker.once('online', resolve));
  return {
    go: () => {
      const at = performance.now();
      Atomics.store(flag, 0, 1);
      Atomics.notify(flag, 0);
      return at;
    },
    done,
  };
}

test('an idle socket is polled until the next request arrives, from another thread while the loop is held', () =>
  withSocketPair(async (ours, theirs) => {
    const poller = new IdlePoller(10_000_000, () => [{ idle: true, pollFd: ours }]);
    const writer = await writeLater(theirs, 30);
    const started = writer.go();
    poller.activity();
    await nextTurn();
    const heldMs = performance.now() - started;
    await writer.done;
    assert.deepEqual(poller.counts, { polls: 1, found: 1 });
    // Held until the byte came, 30 ms or more after go(), and far short of the 10 s budget.
    assert.ok(heldMs >= 30 && heldMs < 5000, `poll lasted ${heldMs} ms`);
  }));

test('a client that goes away (EOF) ends the poll at once', async () => {
  const [ours, theirs] = socketPair();
  try {
    closeFd(theirs);
    const poller = new IdlePoller(10_000_000, () => [{ idle: true, pollFd: ours }]);
    poller.activity();
    await nextTurn();
    assert.deepEqual(poller.counts, { polls: 1, found: 1 });
  } finally {
    closeFd(ours);
  }
});

test('a pause longer than the budget stops polling until a pause is shorter than it again', () =>
  withSocketPair(async (ours) => {
    const poller = new IdlePoller(40_000, () => [{ idle: true, pollFd: ours }]);
    poller.activity();
    await nextTurn();
    assert.deepEqual(poller.counts, { polls: 1, found: 0 }, 'nothing came within the budget');
    poller.activity();
    await nextTurn();
    assert.equal(poller.counts.polls, 1, 'the next idle moment sleeps instead');
    // Activity right away: that pause was far shorter than 40 ms, so polling pays again.
    poller.activity();
    await nextTurn();
    assert.equal(poller.counts.polls, 2);
    poller.activity();
    await nextTurn();
    await sleep(120);
    poller.activity();
    await nextTurn();
    assert.equal(poller.counts.polls, 2, 'a 120 ms pause is not worth polling for');
  }));

test('nothing is polled while a connection is busy, cannot be watched, or polling is off', () =>
  withSocketPair(async (ours) => {
    const cases: { label: string; maxUs: number; sources: PollSource[] }[] = [
      { label: 'a request in flight', maxUs: 10_000_000, sources: [{ idle: true, pollFd: ours }, { idle: false, pollFd: ours }] },
      { label: 'a TLS connection', maxUs: 10_000_000, sources: [{ idle: true, pollFd: ours }, { idle: true, pollFd: -1 }] },
      { label: 'no connections', maxUs: 10_000_000, sources: [] },
      { label: 'polling off', maxUs: 0, sources: [{ idle: true, pollFd: ours }] },
    ];
    for (const c of cases) {
      const poller = new IdlePoller(c.maxUs, () => c.sources);
      poller.activity();
      await nextTurn();
      assert.deepEqual(poller.counts, { polls: 0, found: 0 }, c.label);
    }
  }));

test('many sockets are watched at once: bytes on the last one end the poll', async () => {
  const pairs = Array.from({ length: 9 }, () => socketPair());
  try {
    const poller = new IdlePoller(10_000_000, () => pairs.map(([ours]) => ({ idle: true, pollFd: ours })));
    const writer = await writeLater(pairs[8]![1], 20);
    writer.go();
    poller.activity();
    await nextTurn();
    await writer.done;
    assert.deepEqual(poller.counts, { polls: 1, found: 1 });
  } finally {
    for (const [a, b] of pairs) {
      closeFd(a);
      closeFd(b);
    }
  }
});
