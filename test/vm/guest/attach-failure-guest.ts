// Runs inside the test VM (nbd loaded): what happens when things go wrong around an attached
// device. kill -9 of the supervisor while mounted (I/O fails within the timeout, no hung
// task, gc reclaims), the watched process exiting, SIGHUP, the ioctl interface, several
// connections, and an attach that fails leaving nothing behind.

import { spawn } from 'node:child_process';
import { appendFileSync, existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { attachImage } from '../../../src/kernel/attach.js';
import { detachDevice } from '../../../src/kernel/attach-detach.js';
import { listAttached } from '../../../src/kernel/attach-list.js';
import { readDeviceState, runDir } from '../../../src/kernel/state.js';
import type { AttachInfo } from '../../../src/kernel/supervisor-protocol.js';
import { cli, fail, mountedAt, processAlive, released, scratch, sh, shStatus, sleep, sysRead, waitUntil, writeReadMarker } from './attach-common.js';
import { errorDetail, reportCheck, runCheck } from './report.js';

const SUITE = 'attach-failure';
const dir = runDir();
const check = <T>(name: string, fn: () => Promise<T> | T) => runCheck(SUITE, name, fn);

function timing(name: string, t0: number): void {
  const path = process.env.IMGBD_VM_RESULTS;
  if (path) appendFileSync(path, `${JSON.stringify({ timing: name, ms: Date.now() - t0 })}\n`);
}

/** Processes in uninterruptible sleep (D), by pid and name. */
function dStateTasks(): string[] {
  const out: string[] = [];
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    const status = sysRead(`/proc/${pid}/status`);
    if (status && /^State:\s+D/m.test(status)) out.push(`${pid}:${/^Name:\s+(.*)$/m.exec(status)?.[1]}`);
  }
  return out;
}

async function gone(info: AttachInfo, mnt: string | null): Promise<void> {
  await waitUntil(`${info.device} torn down`, () => !processAlive(info.supervisorPid) && released(info.index) && !existsSync(`${dir}/nbd${info.index}.json`) && (mnt === null || !mountedAt(mnt)));
}

async function killNine(): Promise<void> {
  const t0 = Date.now();
  const info = await check('kill9-attach-mounted', async () => {
    const a = await attachImage({ image: `${scratch}/k.img`, mount: { dir: '/tmp/k' }, timeoutSeconds: 5 });
    sh('echo before > /tmp/k/before && sync -f /tmp/k/before');
    return a;
  });
  if (!info) return;
  process.kill(info.supervisorPid, 'SIGKILL');
  await waitUntil('supervisor dead', () => !processAlive(info.supervisorPid), 30_000);
  await check('kill9-io-fails-within-timeout', () => {
    // `timeout` turns a hang into status 124; the read must fail on its own, and soon.
    const read = shStatus(`timeout 60 dd if=${info.device} of=/dev/null bs=4096 count=1 skip=3000 iflag=direct`, 90_000);
    if (read.status === 0 || read.status === 124) fail(`direct read: status ${read.status} after ${read.ms} ms: ${read.out}`);
    const write = shStatus('timeout 60 dd if=/dev/zero of=/tmp/k/after bs=64k count=4 conv=fsync', 90_000);
    if (write.status === 0 || write.status === 124) fail(`write + fsync: status ${write.status} after ${write.ms} ms: ${write.out}`);
    return { readMs: read.ms, writeMs: write.ms };
  });
  await check('kill9-no-hung-task', async () => {
    // Requests in flight at the kill may wait out the timeout: give them that, no more.
    let tasks = dStateTasks();
    const deadline = Date.now() + 30_000;
    while (tasks.length > 0 && Date.now() < deadline) {
      await sleep(200);
      tasks = dStateTasks();
    }
    if (tasks.length > 0) fail(`tasks in D state: ${tasks.join(' ')}`);
    const dmesg = sh('dmesg');
    if (/blocked for more than/.test(dmesg)) fail(dmesg.split('\n').filter((l) => /blocked for more than/.test(l)).join('\n'));
    return true;
  });
  await check('kill9-list-shows-dead', () => {
    const d = listAttached(dir).devices.find((x) => x.state.index === info.index);
    if (!d || d.supervisorAlive || d.state.mountpoint !== '/tmp/k') fail(JSON.stringify(d));
    return { alive: d.supervisorAlive, mounts: d.mounts };
  });
  await check('kill9-gc-reclaims', async () => {
    const r = cli('gc');
    if (r.status !== 0) fail(`gc exited ${r.status}: ${r.stderr}`);
    if (r.stdout.trim() !== info.device) fail(`gc printed ${r.stdout}`);
    if (!released(info.index)) fail('device not released');
    if (existsSync(`${dir}/nbd${info.index}.json`)) fail('state left');
    if (mountedAt('/tmp/k')) fail('still mounted');
    return r.stdout.trim();
  });
  timing('kill9', t0);
}

async function watchPid(): Promise<void> {
  const t0 = Date.now();
  await check('watch-pid-exit-tears-down', async () => {
    const watched = spawn('sleep', ['600'], { stdio: 'ignore' });
    const a = await attachImage({ image: `${scratch}/w.img`, mount: { dir: '/tmp/w' }, watchPid: watched.pid! });
    sh('echo watched > /tmp/w/file && sync -f /tmp/w/file');
    watched.kill('SIGKILL');
    await gone(a, '/tmp/w');
    const log = readFileSync(a.log, 'utf8');
    const order = ['stopping: watched process', 'unmounted /tmp/w', 'exiting:'].map((s) => log.indexOf(s));
    if (order.some((i) => i < 0) || order[0]! > order[1]! || order[1]! > order[2]!) fail(`log order: ${log}`);
    return order;
  });
  timing('watch-pid', t0);
}

async function sighup(): Promise<void> {
  await check('sighup-tears-down', async () => {
    const a = await attachImage({ image: `${scratch}/w.img`, mount: { dir: '/tmp/w' } });
    if (sh('cat /tmp/w/file').trim() !== 'watched') fail('data written before the watch-pid teardown is missing');
    process.kill(a.supervisorPid, 'SIGHUP');
    await gone(a, '/tmp/w');
    return a.device;
  });
}

async function ioctlAndMultiConn(): Promise<void> {
  const t0 = Date.now();
  await check('ioctl-interface', async () => {
    const a = await attachImage({ image: `${scratch}/i.img`, interface: 'ioctl' });
    try {
      if (a.interface !== 'ioctl') fail(`interface ${a.interface}`);
      if (!existsSync(`/sys/block/nbd${a.index}/pid`)) fail('no pid file');
      const got = writeReadMarker(a.device, 'imgbd-ioctl');
      if (got !== 'imgbd-ioctl') fail(`read back ${got}`);
      return a.device;
    } finally {
      await detachDevice(readDeviceState(dir, a.index)!, { runDir: dir });
      if (!released(a.index)) fail('not released');
    }
  });
  await check('four-connections', async () => {
    const a = await attachImage({ image: `${scratch}/i.img`, connections: 4 });
    try {
      if (a.connections !== 4) fail(`connections ${a.connections}`);
      if (!readFileSync(a.log, 'utf8').includes('4 connection(s)')) fail('log does not show 4 connections');
      sh(`dd if=/dev/urandom of=/tmp/rand bs=1M count=8 status=none && dd if=/tmp/rand of=${a.device} bs=1M oflag=direct conv=fsync status=none`);
      const back = sh(`dd if=${a.device} bs=1M count=8 iflag=direct status=none | sha256sum`).split(' ')[0];
      const sum = sh('sha256sum /tmp/rand').split(' ')[0]!;
      if (back !== sum) fail('data read back differs');
      writeFileSync(`${scratch}/multiconn.sha256`, `${sum}\n`);
      return a.device;
    } finally {
      await detachDevice(readDeviceState(dir, a.index)!, { runDir: dir });
    }
  });
  timing('ioctl-multiconn', t0);
}

async function failedAttach(): Promise<void> {
  await check('failed-attach-leaves-nothing', async () => {
    const before = readdirSync('/sys/block').filter((n) => n.startsWith('nbd') && existsSync(`/sys/block/${n}/pid`));
    try {
      await attachImage({ image: `${scratch}/i.img`, partition: 1 });
      fail('attached partition 1 of an image without a partition table');
    } catch (e) {
      if ((e as { code?: string }).code !== 'ERR_USAGE') throw e;
      const after = readdirSync('/sys/block').filter((n) => n.startsWith('nbd') && existsSync(`/sys/block/${n}/pid`));
      if (after.length !== before.length) fail(`connected before ${before} after ${after}`);
      if (readdirSync(dir).some((n) => n.endsWith('.json'))) fail('a state file was written');
      return (e as Error).message;
    }
  });
}

async function main(): Promise<void> {
  sh('mkdir -p /tmp/k /tmp/w');
  await killNine();
  await watchPid();
  await sighup();
  await ioctlAndMultiConn();
  await failedAttach();
}

main().catch((err) => {
  reportCheck(SUITE, 'guest-script', false, errorDetail(err));
  process.exitCode = 1;
});
