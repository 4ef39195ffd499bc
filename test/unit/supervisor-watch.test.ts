// Watching a process for exit (src/sys/pidfd.ts), which tears an attached device down when
// a container monitor dies: pidfd when the kernel has it, polling otherwise.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { test } from 'node:test';
import { processExists, watchProcess } from '../../src/sys/pidfd.js';

test('the watch resolves after the process exits, not before', { timeout: 30_000 }, async () => {
  const child = spawn('sleep', ['30'], { stdio: 'ignore' });
  const w = watchProcess(child.pid!, 50);
  assert.equal(w.mechanism, 'pidfd');
  let done = false;
  void w.exited.then(() => (done = true));
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(done, false);
  child.kill('SIGKILL');
  await w.exited;
  assert.equal(done, true);
});

test('a process that is already gone resolves at once', async () => {
  const child = spawn('true', { stdio: 'ignore' });
  await new Promise((r) => child.once('exit', r));
  // Reaped by Node: the pid no longer exists.
  assert.equal(processExists(child.pid!), false);
  await watchProcess(child.pid!, 50).exited;
});

test('stop() ends the watch without resolving', { timeout: 30_000 }, async () => {
  const child = spawn('sleep', ['30'], { stdio: 'ignore' });
  const w = watchProcess(child.pid!, 50);
  let done = false;
  void w.exited.then(() => (done = true));
  w.stop();
  child.kill('SIGKILL');
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(done, false);
});
