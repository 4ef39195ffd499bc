// Runs inside the test VM (nbd loaded): attach end to end on real images — raw and qcow2
// through mkfs, 64 MiB of data, detach and re-attach; 8 concurrent attaches; a GPT image's
// partition nodes and each partition attached alone and mounted; detach refusals. The host
// test (attach.test.ts) checks the images afterwards with e2fsck, debugfs and qemu-img.

import { appendFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { attachImage } from '../../../src/kernel/attach.js';
import { DeviceBusyError, detachDevice } from '../../../src/kernel/attach-detach.js';
import { readDeviceState, runDir } from '../../../src/kernel/state.js';
import type { AttachInfo } from '../../../src/kernel/supervisor-protocol.js';
import { cli, fail, mountedAt, nodeMatchesSysfs, processAlive, released, scratch, sh, sha256, shStatus, sysRead, waitUntil, writeReadMarker } from './attach-common.js';
import { errorDetail, reportCheck, runCheck } from './report.js';

const SUITE = 'attach-data';
const dir = runDir();
const check = <T>(name: string, fn: () => Promise<T> | T) => runCheck(SUITE, name, fn);
const sums: Record<string, string> = {};

function timing(name: string, t0: number): void {
  const path = process.env.IMGBD_VM_RESULTS;
  const line = `${JSON.stringify({ timing: name, ms: Date.now() - t0 })}\n`;
  if (path) appendFileSync(path, line);
}

async function detach(info: AttachInfo, force = false): Promise<void> {
  const state = readDeviceState(dir, info.index) ?? fail(`no state for ${info.device}`);
  await detachDevice(state, { runDir: dir, force });
  if (!released(info.index)) fail(`${info.device} not released after detach`);
  if (existsSync(`${dir}/nbd${info.index}.json`)) fail('state file left behind');
  if (processAlive(info.supervisorPid)) fail('supervisor still alive');
}

async function rawAndRefusals(): Promise<void> {
  const image = `${scratch}/raw.img`;
  let t0 = Date.now();
  const first = await check('raw-attach-cli-json', () => {
    const r = cli(`attach --json ${image}`);
    if (r.status !== 0) fail(`attach exited ${r.status}: ${r.stderr}`);
    const info = JSON.parse(r.stdout) as AttachInfo;
    if (info.format !== 'raw' || info.image !== image || info.partition !== null || info.mountpoint !== null) fail(r.stdout);
    if (!/^\/dev\/nbd\d+$/.test(info.device) || info.partitions.length !== 0) fail(r.stdout);
    const state = JSON.parse(readFileSync(`${dir}/nbd${info.index}.json`, 'utf8')) as Record<string, unknown>;
    for (const k of ['index', 'image', 'format', 'partition', 'pid', 'mountpoint', 'connections', 'created']) if (!(k in state)) fail(`state lacks ${k}`);
    if (state.pid !== info.supervisorPid) fail('state pid differs from the reported supervisor');
    return info;
  });
  timing('raw-attach-cli', t0);
  if (!first) return;
  const sys = `/sys/block/nbd${first.index}`;
  await check('raw-device-and-supervisor', () => {
    const size = Number(sysRead(`${sys}/size`));
    if (size !== (256 * 1024 * 1024) / 512) fail(`size ${size}`);
    const backend = sysRead(`${sys}/backend`);
    if (backend !== `imgbd:${image}`) fail(`backend ${backend}`);
    const pid = first.supervisorPid;
    const oom = sysRead(`/proc/${pid}/oom_score_adj`);
    if (oom !== '-1000') fail(`oom_score_adj ${oom}`);
    // Field 6 of /proc/pid/stat (after the parenthesised name) is the session id.
    const stat = sysRead(`/proc/${pid}/stat`) ?? '';
    const session = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[3]);
    if (session !== pid) fail(`supervisor session ${session}, not its own`);
    const log = readFileSync(first.log, 'utf8');
    if (/PR_SET_IO_FLUSHER|oom_score_adj:/.test(log)) fail(`hardening failed: ${log}`);
    return { size, backend, oom, session };
  });
  t0 = Date.now();
  await check('raw-mkfs-write-64m', () => {
    sh(`mkfs.ext4 -q -F ${first.device} && mkdir -p /tmp/m /tmp/m2 && mount -t ext4 ${first.device} /tmp/m`);
    sh('dd if=/dev/urandom of=/tmp/m/data bs=1M count=64 conv=fsync status=none');
    sums.raw = sha256('/tmp/m/data');
    sh('umount /tmp/m');
    return sums.raw;
  });
  timing('raw-mkfs-write', t0);
  t0 = Date.now();
  await check('raw-detach', () => detach(first));
  timing('raw-detach', t0);

  t0 = Date.now();
  const again = await check('raw-reattach-mount', async () => {
    const info = await attachImage({ image, mount: { dir: '/tmp/m', options: 'noatime' } });
    if (info.fstype !== 'ext4' || info.mountpoint !== '/tmp/m' || !mountedAt('/tmp/m')) fail(JSON.stringify(info));
    const sum = sha256('/tmp/m/data');
    if (sum !== sums.raw) fail(`checksum ${sum} != ${sums.raw}`);
    return { device: info.device, sum };
  });
  timing('raw-reattach', t0);
  if (!again) return;
  const state = readDeviceState(dir, Number(again.device.slice('/dev/nbd'.length)))!;

  await check('detach-refused-foreign-mount', async () => {
    sh(`mount -t ext4 ${state.device} /tmp/m2`);
    try {
      await detachDevice(state, { runDir: dir });
      fail('detach went ahead while mounted by someone else');
    } catch (e) {
      if (!(e instanceof DeviceBusyError) || !e.message.includes('/tmp/m2')) throw e;
      if (!processAlive(state.pid) || !mountedAt('/tmp/m')) fail('a refused detach touched the device');
      return e.message;
    } finally {
      sh('umount /tmp/m2');
    }
  });

  await check('detach-refused-opener', async () => {
    const holder = spawn('sh', ['-c', `exec sleep 600 < ${state.device}`], { stdio: 'ignore' });
    await waitUntil('holder open', () => sh(`ls -l /proc/${holder.pid}/fd/ 2>/dev/null || true`).includes(state.device), 30_000);
    try {
      await detachDevice(state, { runDir: dir });
      fail('detach went ahead while another process had the device open');
    } catch (e) {
      if (!(e instanceof DeviceBusyError) || !e.message.includes(`pid ${holder.pid}`)) throw e;
      return e.message;
    } finally {
      holder.kill('SIGKILL');
      await new Promise((r) => holder.once('exit', r));
    }
  });

  await check('detach-cli-by-mountpoint', () => {
    const r = cli('detach /tmp/m');
    if (r.status !== 0) fail(`detach exited ${r.status}: ${r.stderr}`);
    if (r.stdout.trim() !== state.device) fail(r.stdout);
    if (mountedAt('/tmp/m')) fail('still mounted');
    if (!released(state.index)) fail('not released');
    if (processAlive(state.pid)) fail('supervisor alive');
    return r.stdout.trim();
  });
}

async function qcow2(): Promise<void> {
  const image = `${scratch}/disk.qcow2`;
  const t0 = Date.now();
  const info = await check('qcow2-attach-mkfs-write', async () => {
    const a = await attachImage({ image });
    if (a.format !== 'qcow2') fail(`format ${a.format}`);
    sh(`mkfs.ext4 -q -F ${a.device} && mount -t ext4 ${a.device} /tmp/m`);
    sh('dd if=/dev/urandom of=/tmp/m/data bs=1M count=64 conv=fsync status=none');
    sums.qcow2 = sha256('/tmp/m/data');
    sh('umount /tmp/m');
    await detach(a);
    return a;
  });
  if (!info) return;
  await check('qcow2-reattach-read-only', async () => {
    const a = await attachImage({ image, readOnly: true, mount: { dir: '/tmp/m' } });
    try {
      if (sysRead(`/sys/block/nbd${a.index}/ro`) !== '1') fail('device not read-only');
      const sum = sha256('/tmp/m/data');
      if (sum !== sums.qcow2) fail(`checksum ${sum} != ${sums.qcow2}`);
      const w = shStatus('echo x > /tmp/m/new');
      if (w.status === 0) fail('wrote to a read-only mount');
      return sum;
    } finally {
      await detach(a);
    }
  });
  await check('qcow2-clone-elsewhere-needs-allow-backing', async () => {
    // A clone in another directory: its base is only followed where the user allowed it.
    sh(`mkdir -p /tmp/clones && qemu-img create -q -f qcow2 -b ${image} -F qcow2 /tmp/clones/c.qcow2`);
    const refused = cli('attach -r /tmp/clones/c.qcow2');
    if (refused.status === 0) fail(`attach followed a backing file outside the allowed roots: ${refused.stdout}`);
    if (!/--allow-backing/.test(refused.stderr)) fail(`the refusal does not say what to do: ${refused.stderr}`);
    const a = await attachImage({ image: '/tmp/clones/c.qcow2', readOnly: true, allowBacking: [scratch], mount: { dir: '/tmp/m' } });
    try {
      const sum = sha256('/tmp/m/data');
      if (sum !== sums.qcow2) fail(`checksum through the clone ${sum} != ${sums.qcow2}`);
      return sum;
    } finally {
      await detach(a);
    }
  });
  timing('qcow2', t0);
}

async function concurrent(): Promise<void> {
  const t0 = Date.now();
  await check('eight-concurrent-attaches', async () => {
    const images = Array.from({ length: 8 }, (_, i) => `${scratch}/c${i}.img`);
    const infos = await Promise.all(images.map((image) => attachImage({ image })));
    const indices = new Set(infos.map((i) => i.index));
    if (indices.size !== 8) fail(`devices ${infos.map((i) => i.device).join(' ')}`);
    infos.forEach((info, i) => {
      const got = writeReadMarker(info.device, `imgbd-concurrent-${i}`);
      if (got !== `imgbd-concurrent-${i}`) fail(`${info.device} read back ${JSON.stringify(got)}`);
    });
    await Promise.all(infos.map((i) => detach(i)));
    return infos.map((i) => i.device);
  });
  timing('concurrent-8', t0);
}

async function gpt(): Promise<void> {
  const image = `${scratch}/gpt.img`;
  let t0 = Date.now();
  const whole = await check('gpt-partition-nodes', async () => {
    const a = await attachImage({ image });
    const sys = `/sys/block/nbd${a.index}`;
    const numbers = a.partitions.map((p) => p.number).join(',');
    if (numbers !== '1,2,3') fail(`partitions ${numbers}`);
    for (const p of a.partitions) {
      const name = p.device.slice('/dev/'.length);
      if (!nodeMatchesSysfs(name, `${sys}/${name}`)) fail(`${p.device} does not match sysfs`);
      sh(`mkfs.ext4 -q -F -L part${p.number} ${p.device}`);
    }
    await detach(a);
    return a;
  });
  timing('gpt-whole', t0);
  if (!whole) return;
  t0 = Date.now();
  await check('gpt-each-partition-mounted', async () => {
    const selectors = [1, 2, { name: 'third' }] as const;
    const infos: AttachInfo[] = [];
    try {
      for (const [i, partition] of selectors.entries()) {
        const mnt = `/tmp/p${i + 1}`;
        sh(`mkdir -p ${mnt}`);
        const a = await attachImage({ image, partition, mount: { dir: mnt } });
        infos.push(a);
        // A partition alone has no table: stale nbdNpM nodes from the whole-image attach are not partitions.
        if (a.partitions.length !== 0) fail(`partition export lists partitions ${JSON.stringify(a.partitions)}`);
        if (a.fstype !== 'ext4') fail(`fstype ${a.fstype}`);
        const label = sh(`cat /sys/block/nbd${a.index}/size`).trim();
        writeFileSync(`${mnt}/p${i + 1}.txt`, `partition ${i + 1} via ${a.device}\n`);
        sh(`sync -f ${mnt}/p${i + 1}.txt`);
        if (Number(label) * 512 !== a.sizeBytes) fail(`size ${label}`);
      }
      const r = cli('list --json');
      if (r.status !== 0) fail(`list exited ${r.status}: ${r.stderr}`);
      const listed = JSON.parse(r.stdout) as Array<{ device: string; partition: unknown; mountpoint: string; supervisorAlive: boolean }>;
      for (const [i, a] of infos.entries()) {
        const l = listed.find((x) => x.device === a.device);
        if (!l || !l.supervisorAlive || l.mountpoint !== `/tmp/p${i + 1}` || JSON.stringify(l.partition) !== JSON.stringify(selectors[i])) {
          fail(`list: ${r.stdout}`);
        }
      }
      return infos.map((a) => `${a.device}:${JSON.stringify(a.partition)}`);
    } finally {
      // Every one, even when an earlier detach fails; the first failure is reported.
      const results = await Promise.allSettled(infos.map((a) => detach(a)));
      const bad = results.find((x) => x.status === 'rejected');
      if (bad) throw (bad as PromiseRejectedResult).reason;
    }
  });
  timing('gpt-partitions', t0);
}

async function main(): Promise<void> {
  sh('mkdir -p /tmp/m /tmp/m2');
  await rawAndRefusals();
  await qcow2();
  await concurrent();
  await gpt();
  writeFileSync(`${scratch}/sums.json`, JSON.stringify(sums));
  await check('nothing-left-attached', () => {
    const left = sh('ls /sys/block/ | grep ^nbd').split('\n').filter((n) => n && existsSync(`/sys/block/${n}/pid`));
    if (left.length > 0) fail(`still connected: ${left.join(' ')}`);
    return true;
  });
}

main().catch((err) => {
  reportCheck(SUITE, 'guest-script', false, errorDetail(err));
  process.exitCode = 1;
});
