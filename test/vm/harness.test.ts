// The VM harness's own contract: the script's exit status, output and JSON-line results come
// back; extra shares are mounted where asked, read-only ones refusing writes; a guest that
// overruns its time is killed and reported as ERR_VM_TIMEOUT.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/peers.js';
import { requireVm, runInVm, VmError } from './harness.js';

test('exit status, output, results and extra shares come back from one boot', { timeout: 300_000 }, async (t) => {
  const assets = requireVm(t);
  if (!assets) return;
  const scratch = tempDir(t, 'imgbd-vm-h-');
  const ro = tempDir(t, 'imgbd-vm-ro-');
  const rw = tempDir(t, 'imgbd-vm-rw-');
  writeFileSync(join(ro, 'input.txt'), 'from the host\n');
  mkdirSync(join(rw, 'sub'));
  const r = await runInVm({
    timeoutMs: 240_000,
    scratchDir: scratch,
    extraShares: [{ hostPath: ro, readOnly: true }, { hostPath: rw, guestPath: '/run/rw' }],
    script: `
      echo "{\\"uid\\":$(id -u),\\"kernel\\":\\"$(uname -r)\\",\\"cwd\\":\\"$(pwd)\\"}" >> "$IMGBD_VM_RESULTS"
      cat ${ro}/input.txt
      if touch ${ro}/nope 2>/dev/null; then echo '{"roWrite":"allowed"}'; else echo '{"roWrite":"refused"}'; fi >> "$IMGBD_VM_RESULTS"
      echo guest-wrote > /run/rw/sub/out.txt
      echo to-stderr >&2
      exit 7
    `,
  });
  assert.equal(r.exitCode, 7, r.console);
  assert.match(r.output, /from the host/);
  assert.match(r.output, /to-stderr/);
  const [who, roWrite] = r.results as Array<Record<string, unknown>>;
  assert.equal(who?.uid, 0);
  assert.equal(who?.kernel, assets.kernelVersion);
  assert.equal(who?.cwd, process.cwd());
  assert.deepEqual(roWrite, { roWrite: 'refused' });
  assert.equal(readFileSync(join(rw, 'sub', 'out.txt'), 'utf8'), 'guest-wrote\n');
  t.diagnostic(`boot to poweroff: ${r.elapsedMs} ms`);
});

function qemuProcessesMentioning(text: string): number[] {
  const pids: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const cmd = readFileSync(`/proc/${name}/cmdline`, 'utf8');
      if (cmd.startsWith('qemu-system') && cmd.includes(text)) pids.push(Number(name));
    } catch {
      // The process exited while we looked.
    }
  }
  return pids;
}

test('a guest that overruns its time is killed and reported as ERR_VM_TIMEOUT', { timeout: 120_000 }, async (t) => {
  if (!requireVm(t)) return;
  const scratch = tempDir(t, 'imgbd-vm-to-');
  await assert.rejects(
    runInVm({ timeoutMs: 8_000, scratchDir: scratch, script: 'sleep 600\n' }),
    (e: unknown) => e instanceof VmError && e.code === 'ERR_VM_TIMEOUT',
  );
  // SIGKILL is asynchronous: give the kernel a moment to reap it.
  const deadline = Date.now() + 5_000;
  while (qemuProcessesMentioning(scratch).length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(qemuProcessesMentioning(scratch), []);
});
