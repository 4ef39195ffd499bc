// One boot of the kernel VM for `imgbd attach` on real images (guest/attach-data-guest.ts):
// raw and qcow2 through mkfs.ext4, 64 MiB written, detach, re-attach with equal checksums (and
// through a clone elsewhere, which needs --allow-backing);
// 8 concurrent attaches on 8 distinct devices; a GPT image's three partitions as nodes and
// each attached alone and mounted; detach refused while someone else uses the device.
// Afterwards the host checks the images themselves: e2fsck, debugfs, qemu-img check.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { requirePeers, tempDir } from '../helpers/peers.js';
import { assertVmChecks, vmTimings } from './checks.js';
import { guestNodeCommand, requireVm, runInVm, shQuote } from './harness.js';

const MiB = 1024 * 1024;

function prepareImages(dir: string): void {
  execFileSync('truncate', ['-s', String(256 * MiB), join(dir, 'raw.img')]);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'disk.qcow2'), String(256 * MiB)]);
  for (let i = 0; i < 8; i++) execFileSync('truncate', ['-s', String(32 * MiB), join(dir, `c${i}.img`)]);
  const gpt = join(dir, 'gpt.img');
  execFileSync('truncate', ['-s', String(96 * MiB), gpt]);
  execFileSync('sfdisk', ['-q', gpt], { input: 'label: gpt\nsize=28MiB, name=first\nsize=28MiB, name=second\nsize=28MiB, name=third\n' });
}

function script(): string {
  const imgbd = guestNodeCommand(new URL('../../src/cli/main', import.meta.url));
  return `set -u
modprobe nbd nbds_max=16 max_part=16
export IMGBD_CLI=${shQuote(imgbd)}
${guestNodeCommand(new URL('./guest/attach-data-guest', import.meta.url))}
`;
}

function fileFromExt4(image: string, path: string): Buffer {
  return execFileSync('debugfs', ['-R', `cat ${path}`, image], { stdio: ['ignore', 'pipe', 'ignore'], maxBuffer: 128 * MiB });
}

function sha256(data: Buffer): string {
  return execFileSync('sha256sum', { input: data }).toString().split(' ')[0]!;
}

test('kernel VM: imgbd attach of raw, qcow2, concurrent and partitioned images', { timeout: 960_000 }, async (t) => {
  if (!requireVm(t) || !requirePeers(t, 'qemu-img', 'sfdisk', 'e2fsck', 'debugfs')) return;
  const dir = tempDir(t, 'imgbd-vm-attach-');
  prepareImages(dir);
  const r = await runInVm({ script: script(), scratchDir: dir, timeoutMs: 840_000, memoryMb: 2048 });
  t.diagnostic(`boot to poweroff: ${r.elapsedMs} ms; ${vmTimings(r).map((x) => `${x.timing} ${x.ms} ms`).join(', ')}`);
  const sumsFile = join(dir, 'sums.json');
  const sums = (existsSync(sumsFile) ? JSON.parse(readFileSync(sumsFile, 'utf8')) : {}) as Record<string, string>;

  await t.test('guest script finished', () => {
    assert.equal(r.exitCode, 0, `guest output:\n${r.output.slice(-3000)}\nconsole:\n${r.console.slice(-3000)}`);
  });

  await t.test('raw: attach --json, mkfs, 64 MiB, detach, re-attach --mount, same checksum', () => {
    assertVmChecks(r, 'attach-data', ['raw-attach-cli-json', 'raw-device-and-supervisor', 'raw-mkfs-write-64m', 'raw-detach', 'raw-reattach-mount', 'detach-cli-by-mountpoint']);
    const image = join(dir, 'raw.img');
    execFileSync('e2fsck', ['-fn', image], { stdio: 'pipe' });
    assert.equal(sha256(fileFromExt4(image, '/data')), sums.raw);
  });

  await t.test('detach refuses a foreign mount and a foreign opener', () => {
    assertVmChecks(r, 'attach-data', ['detach-refused-foreign-mount', 'detach-refused-opener']);
  });

  await t.test('qcow2: written through the kernel, clean for qemu-img check, same data read-only and through a clone', () => {
    assertVmChecks(r, 'attach-data', ['qcow2-attach-mkfs-write', 'qcow2-reattach-read-only', 'qcow2-clone-elsewhere-needs-allow-backing']);
    const image = join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['check', '-q', image], { stdio: 'pipe' });
    const raw = join(dir, 'qcow2-as-raw.img');
    execFileSync('qemu-img', ['convert', '-O', 'raw', image, raw]);
    execFileSync('e2fsck', ['-fn', raw], { stdio: 'pipe' });
    assert.equal(sha256(fileFromExt4(raw, '/data')), sums.qcow2);
  });

  await t.test('8 concurrent attaches: 8 devices, each writing its own image', () => {
    assertVmChecks(r, 'attach-data', ['eight-concurrent-attaches']);
    for (let i = 0; i < 8; i++) {
      const head = readFileSync(join(dir, `c${i}.img`)).subarray(0, `imgbd-concurrent-${i}`.length).toString();
      assert.equal(head, `imgbd-concurrent-${i}`);
    }
  });

  await t.test('GPT: partition nodes, each partition attached alone (IMAGE:N, :name=) and mounted', () => {
    assertVmChecks(r, 'attach-data', ['gpt-partition-nodes', 'gpt-each-partition-mounted', 'nothing-left-attached']);
    const image = join(dir, 'gpt.img');
    const table = JSON.parse(execFileSync('sfdisk', ['--json', image]).toString()) as { partitiontable: { partitions: Array<{ start: number; size: number }> } };
    table.partitiontable.partitions.forEach((p, i) => {
      const part = join(dir, `part${i + 1}.img`);
      writeFileSync(part, readFileSync(image).subarray(p.start * 512, (p.start + p.size) * 512));
      execFileSync('e2fsck', ['-fn', part], { stdio: 'pipe' });
      assert.match(fileFromExt4(part, `/p${i + 1}.txt`).toString(), new RegExp(`^partition ${i + 1} via /dev/nbd\\d+\\n$`));
    });
  });
});
