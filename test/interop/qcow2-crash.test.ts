// Crash safety: a process writing through the qcow2 driver is killed with SIGKILL at an
// arbitrary moment. `qemu-img check` may then find leaked clusters but never corruption, and
// every write acknowledged with FUA reads back.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { requirePeers, runOk, tempDir } from '../helpers/peers.js';
import { openQcow2Chain, prng, qemuCheck } from '../fixtures/qcow2/helpers.js';

const MiB = 1024 * 1024;

function writerCommand(): string[] {
  const js = fileURLToPath(new URL('../fixtures/qcow2/crash-writer.js', import.meta.url));
  if (existsSync(js)) return [js];
  return ['--import', 'tsx', fileURLToPath(new URL('../fixtures/qcow2/crash-writer.ts', import.meta.url))];
}

async function runAndKill(img: string, seed: number, killAfterMs: number): Promise<number> {
  const child = spawn(process.execPath, [...writerCommand(), img, String(seed)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  // Kill only once it is writing, at a moment that varies with the seed.
  await new Promise<void>((resolve) => {
    const check = (): void => {
      if (out.includes('\n') || child.exitCode !== null) resolve();
      else setTimeout(check, 5);
    };
    check();
  });
  await new Promise((r) => setTimeout(r, killAfterMs));
  child.kill('SIGKILL');
  await new Promise((r) => child.once('close', r));
  assert.equal(child.signalCode, 'SIGKILL', `writer ended on its own: ${err}`);
  const acked = out.split('\n').filter((l) => l !== '').map(Number);
  return acked.length === 0 ? -1 : Math.max(...acked);
}

for (const lazy of [false, true]) {
  test(`qcow2 crash: SIGKILL mid-write leaves at worst leaks${lazy ? ' (lazy refcounts, repaired on open)' : ''}`, async (t) => {
    if (!requirePeers(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const rnd = prng(lazy ? 77 : 66);
    for (let round = 0; round < 4; round++) {
      const img = join(dir, `crash-${round}.qcow2`);
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${round % 2 ? 4096 : 65536}${lazy ? ',lazy_refcounts=on' : ''}`, img, String(64 * MiB)]);
      const last = await runAndKill(img, round + (lazy ? 100 : 0), 30 + Math.floor(rnd() * 400));
      if (!lazy) {
        const chk = await qemuCheck(img);
        assert.ok(chk.code === 0 || chk.code === 3, `qemu-img check exit ${chk.code}: ${JSON.stringify(chk.json)}`);
        assert.equal(chk.json['check-errors'], 0);
        assert.equal(chk.json.corruptions ?? 0, 0, JSON.stringify(chk.json));
      } else {
        // A writable open rebuilds the refcounts of the dirty image.
        const dev = await openQcow2Chain(img);
        await dev.close();
        const chk = await qemuCheck(img);
        assert.equal(chk.code, 0, JSON.stringify(chk.json));
      }
      const dev = await openQcow2Chain(img, { readOnly: true });
      const b = Buffer.alloc(4096);
      for (let s = 0; s <= last; s++) {
        await dev.pread(b, 32 * MiB + s * 4096);
        assert.ok(b.equals(Buffer.alloc(4096, (s % 255) + 1)), `acknowledged slot ${s} (of ${last}) lost`);
      }
      await dev.close();
    }
  });
}
