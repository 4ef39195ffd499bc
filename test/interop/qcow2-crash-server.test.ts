// kill -9 of `imgbd serve` in the middle of a write storm (writes, FUA writes, write-zeroes,
// trims and flushes from several requests in flight), many times: qemu-img check must find no
// corruption, ever (leaks are allowed: clusters allocated but not yet referenced), and every
// sector whose last write was acknowledged before a completed FLUSH, or was acknowledged with
// FUA, must read back exactly as written.

import { strict as assert } from 'node:assert';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { NbdClient } from '../../src/client/index.js';
import { requirePeers, run, runOk, tempDir } from '../helpers/peers.js';
import { runImgbd, serveImgbd, stopServe } from './qcow2-cli-helpers.js';

const SECTOR = 512;
const MiB = 1024 * 1024;
const RUNS = 24;
const QUEUE_DEPTH = 8;

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Kind = 'write' | 'zero' | 'trim';

interface OpRecord {
  readonly kind: Kind;
  completed: boolean;
  durable: boolean;
}

/** Sector `s` as written by op `id`: (id, s) pairs, so a misplaced or stale sector is caught. */
function fillSector(buf: Buffer, at: number, id: number, s: number): void {
  for (let i = 0; i < SECTOR; i += 8) {
    buf.writeUInt32LE(id, at + i);
    buf.writeUInt32LE(s, at + i + 4);
  }
}

/** The storm's record: what was issued where, what completed, what a flush made durable. */
class Model {
  readonly lastOp: Int32Array;
  readonly ops: OpRecord[] = [];
  private readonly inFlight = new Set<[number, number]>();

  constructor(readonly sectors: number) {
    this.lastOp = new Int32Array(sectors).fill(-1);
  }

  /** A sector range overlapping nothing in flight (so completion order is issue order), or null. */
  pick(r: () => number, maxSectors: number): [number, number] | null {
    for (let tries = 0; tries < 10; tries++) {
      const n = 1 + Math.floor(r() ** 2 * maxSectors);
      const first = Math.floor(r() * (this.sectors - n));
      const clash = [...this.inFlight].some(([a, b]) => first < b && a < first + n);
      if (!clash) return [first, first + n];
    }
    return null;
  }

  issue(kind: Kind, range: [number, number]): number {
    const id = this.ops.length;
    this.ops.push({ kind, completed: false, durable: false });
    for (let s = range[0]; s < range[1]; s++) this.lastOp[s] = id;
    this.inFlight.add(range);
    return id;
  }

  complete(id: number, range: [number, number], fua: boolean): void {
    this.inFlight.delete(range);
    const op = this.ops[id]!;
    op.completed = true;
    if (fua) op.durable = true;
  }

  failed(range: [number, number]): void {
    this.inFlight.delete(range);
  }

  /** Ops a FLUSH issued now covers: completed (replied to) before it was sent. */
  flushable(): number[] {
    const ids: number[] = [];
    this.ops.forEach((o, i) => {
      if (o.completed && !o.durable) ids.push(i);
    });
    return ids;
  }

  /** Sectors that must read back exactly, and how many were checked. */
  verify(image: Buffer): { checked: number; bad: number[] } {
    const bad: number[] = [];
    let checked = 0;
    const expect = Buffer.alloc(SECTOR);
    for (let s = 0; s < this.sectors; s++) {
      const id = this.lastOp[s]!;
      const got = image.subarray(s * SECTOR, (s + 1) * SECTOR);
      if (id === -1) expect.fill(0);
      else {
        const op = this.ops[id]!;
        if (!op.durable || op.kind === 'trim') continue;
        if (op.kind === 'zero') expect.fill(0);
        else fillSector(expect, 0, id, s);
      }
      checked++;
      if (!got.equals(expect)) bad.push(s);
    }
    return { checked, bad };
  }
}

async function storm(uri: string, model: Model, seed: number, stop: () => boolean): Promise<{ acked: number; flushes: number }> {
  let client: NbdClient;
  try {
    client = await NbdClient.connect(uri);
  } catch (err) {
    // A machine slow enough for the kill to land before the handshake: an empty run, not a failure.
    if (stop()) return { acked: 0, flushes: 0 };
    throw err;
  }
  const r = rng(seed);
  let acked = 0;
  let flushes = 0;
  const worker = async (): Promise<void> => {
    while (!stop()) {
      const p = r();
      if (p < 0.08) {
        const ids = model.flushable();
        await client.flush();
        for (const id of ids) model.ops[id]!.durable = true;
        flushes++;
        continue;
      }
      const range = model.pick(r, 512);
      if (range === null) {
        await new Promise((res) => setImmediate(res));
        continue;
      }
      const [first, end] = range;
      const fua = r() < 0.15;
      const kind: Kind = p < 0.8 ? 'write' : p < 0.92 ? 'zero' : 'trim';
      const id = model.issue(kind, range);
      try {
        if (kind === 'write') {
          const buf = Buffer.allocUnsafe((end - first) * SECTOR);
          for (let s = first; s < end; s++) fillSector(buf, (s - first) * SECTOR, id, s);
          await client.pwrite(buf, first * SECTOR, { fua });
        } else if (kind === 'zero') {
          await client.zero(first * SECTOR, (end - first) * SECTOR, { fua, noHole: r() < 0.5 });
        } else {
          await client.trim(first * SECTOR, (end - first) * SECTOR, { fua });
        }
      } catch (err) {
        model.failed(range);
        throw err;
      }
      model.complete(id, range, fua && kind !== 'trim');
      acked++;
    }
  };
  await Promise.allSettled(Array.from({ length: QUEUE_DEPTH }, worker));
  await client.disconnect().catch(() => undefined);
  return { acked, flushes };
}

/** Kill the server at a random moment of a storm on a fresh image; returns the model and image. */
async function crash(t: TestContext, i: number, layout: string): Promise<{ dir: string; image: string; model: Model; acked: number }> {
  const dir = tempDir(t);
  const image = join(dir, 'img.qcow2');
  const sizeBytes = 16 * MiB;
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', layout, image, String(sizeBytes)]);
  const served = await serveImgbd(t, join(dir, 'nbd.sock'), ['-f', 'qcow2', image]);
  const model = new Model(sizeBytes / SECTOR);
  const r = rng(1000 + i);
  let killed = false;
  const delayMs = 150 + Math.floor(r() * 1500);
  const timer = setTimeout(() => {
    killed = true;
    served.child.kill('SIGKILL');
  }, delayMs);
  const result = await storm(served.uri, model, 2000 + i, () => killed);
  clearTimeout(timer);
  assert.equal(await stopServe(served, 'SIGKILL'), 'SIGKILL', `run ${i}: the server should have been killed mid-storm`);
  return { dir, image, model, acked: result.acked };
}

/** Sectors the model knows must read back exactly, checked through qemu's reading of the image. */
async function verifyFlushed(dir: string, image: string, model: Model, what: string): Promise<number> {
  const raw = join(dir, 'out.raw');
  await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, raw]);
  const v = model.verify(readFileSync(raw));
  assert.deepEqual(v.bad.slice(0, 10), [], `${what}: sectors not as flushed (first of ${v.bad.length})`);
  return v.checked;
}

describe('kill -9 of imgbd serve during a write storm', () => {
  it(`${RUNS} crashes: no corruption, flushed data intact`, async (t) => {
    if (!requirePeers(t, 'qemu-img')) return;
    const layouts = ['cluster_size=64k', 'cluster_size=4k', 'cluster_size=64k,extended_l2=on', 'cluster_size=512', 'compat=0.10'];
    let leakRuns = 0;
    let leakedClusters = 0;
    let corruptions = 0;
    let checkedSectors = 0;
    let leaksPastEnd = 0;
    let acked = 0;
    for (let i = 0; i < RUNS; i++) {
      const layout = layouts[i % layouts.length]!;
      const { dir, image, model, acked: n } = await crash(t, i, layout);
      acked += n;

      const check = await run('qemu-img', ['check', '--output=json', image]);
      const report = JSON.parse(check.stdout) as Record<string, number | undefined>;
      assert.ok(check.code === 0 || check.code === 3, `run ${i} (${layout}): qemu-img check exited ${check.code}: ${check.stdout}${check.stderr}`);
      assert.equal(report.corruptions ?? 0, 0, `run ${i} (${layout}): corruptions`);
      corruptions += report.corruptions ?? 0;
      // imgbd's own check must agree with qemu-img's, except that it also counts leaked
      // clusters past the end of the file (allocated in the refcounts, file not yet extended),
      // which qemu-img check does not look at.
      const ours = await runImgbd(['check', '--json', image]);
      const mine = JSON.parse(ours.stdout) as Record<string, number | undefined>;
      for (const k of ['check-errors', 'corruptions', 'total-clusters', 'allocated-clusters', 'fragmented-clusters', 'compressed-clusters']) {
        assert.equal(mine[k], report[k], `run ${i}: imgbd check ${k}`);
      }
      assert.ok((mine.leaks ?? 0) >= (report.leaks ?? 0), `run ${i}: imgbd sees at least qemu-img's leaks`);
      assert.equal(ours.code, (mine.leaks ?? 0) > 0 ? 3 : 0, `run ${i}: imgbd check exit status`);
      if ((mine.leaks ?? 0) > (report.leaks ?? 0)) leaksPastEnd += mine.leaks! - (report.leaks ?? 0);
      if ((report.leaks ?? 0) > 0) {
        leakRuns++;
        leakedClusters += report.leaks!;
      }

      checkedSectors += await verifyFlushed(dir, image, model, `run ${i} (${layout})`);
    }
    t.diagnostic(`runs=${RUNS} acked-requests=${acked} verified-sectors=${checkedSectors} runs-with-leaks=${leakRuns} leaked-clusters=${leakedClusters} (imgbd check also: ${leaksPastEnd} past EOF) corruptions=${corruptions}`);
    assert.ok(acked > RUNS * 10, 'the storms should have had requests acknowledged before the kill');
  });

  it('lazy refcounts: 8 crashes, each repaired by the next writable open, then clean and intact', async (t) => {
    if (!requirePeers(t, 'qemu-img')) return;
    let acked = 0;
    for (let i = 0; i < 8; i++) {
      const { dir, image, model, acked: n } = await crash(t, 500 + i, i % 2 === 0 ? 'lazy_refcounts=on' : 'lazy_refcounts=on,cluster_size=4k');
      acked += n;
      // "The image must be repaired before it is used again": imgbd's repairing open does it.
      const repaired = await runImgbd(['check', '-r', 'leaks', image]);
      assert.equal(repaired.code, 0, `lazy run ${i}: ${repaired.stdout}${repaired.stderr}`);
      const check = await run('qemu-img', ['check', '--output=json', image]);
      assert.equal(check.code, 0, `lazy run ${i}: qemu-img check after repair: ${check.stdout}${check.stderr}`);
      await verifyFlushed(dir, image, model, `lazy run ${i}`);
    }
    assert.ok(acked > 0);
  });
});
