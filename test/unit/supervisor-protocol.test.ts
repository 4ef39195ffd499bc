// The readiness line between `imgbd attach` and its supervisor (supervisor-protocol.ts):
// encoding, validation, a line split at every byte, the length limit, the stream reader, and
// how the supervisor's errors come back as the classes the CLI maps to exit codes.

import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';
import { CorruptImageError, UnsupportedImageError, UsageError } from '../../src/errors.js';
import { buildSupervisorConfig, errorFromSupervisor, readReadiness } from '../../src/kernel/attach.js';
import { decodeReadiness, encodeReadiness, MAX_READINESS_BYTES, ReadinessReader, SupervisorError, type AttachInfo } from '../../src/kernel/supervisor-protocol.js';
import { tempDir } from '../helpers/peers.js';

const INFO: AttachInfo = {
  device: '/dev/nbd5',
  index: 5,
  image: '/img/disk.raw',
  format: 'raw',
  partition: 2,
  supervisorPid: 321,
  mountpoint: '/mnt/d',
  fstype: 'ext4',
  partitions: [{ number: 1, device: '/dev/nbd5p1', sizeBytes: 1048576 }],
  sizeBytes: 8388608,
  connections: 1,
  interface: 'netlink',
  log: '/run/imgbd/nbd5.log',
};

test('ready and error messages are one JSON line and decode to themselves', () => {
  const ready = encodeReadiness({ type: 'ready', info: INFO });
  assert.equal(ready.indexOf('\n'), ready.length - 1);
  assert.deepEqual(decodeReadiness(ready.trimEnd()), { type: 'ready', info: INFO });
  const err = encodeReadiness({ type: 'error', code: 'ERR_NO_FREE_DEVICE', message: 'none' });
  assert.deepEqual(decodeReadiness(err.trimEnd()), { type: 'error', code: 'ERR_NO_FREE_DEVICE', message: 'none' });
});

test('a line split at every byte is read whole, exactly once', () => {
  const bytes = Buffer.from(encodeReadiness({ type: 'ready', info: INFO }));
  for (let cut = 0; cut <= bytes.length; cut++) {
    const r = new ReadinessReader();
    const first = r.push(bytes.subarray(0, cut));
    const second = cut < bytes.length ? r.push(bytes.subarray(cut)) : null;
    const msg = first ?? second;
    assert.deepEqual(msg, { type: 'ready', info: INFO }, `cut at ${cut}`);
  }
});

test('malformed messages are refused', () => {
  const bad = [
    'not json',
    '{"type":"hello"}',
    '{"type":"error","code":1,"message":"x"}',
    JSON.stringify({ type: 'ready', info: { ...INFO, device: '/dev/nbd6' } }),
    JSON.stringify({ type: 'ready', info: { ...INFO, supervisorPid: 0 } }),
    JSON.stringify({ type: 'ready', info: { ...INFO, partitions: [{ number: '1' }] } }),
    JSON.stringify({ type: 'ready', info: { ...INFO, interface: 'x' } }),
    JSON.stringify({ type: 'ready' }),
  ];
  for (const line of bad) assert.throws(() => decodeReadiness(line), { code: 'ERR_SUPERVISOR_PROTOCOL' }, line);
});

test('an over-long line is refused before it is buffered', () => {
  const r = new ReadinessReader();
  r.push(Buffer.alloc(MAX_READINESS_BYTES - 1, 0x20));
  assert.throws(() => r.push(Buffer.alloc(2, 0x20)), { code: 'ERR_SUPERVISOR_PROTOCOL' });
});

test('readReadiness: the message, null on EOF, an error on timeout', async () => {
  const a = new PassThrough();
  const got = readReadiness(a, 5000);
  a.write(encodeReadiness({ type: 'error', code: 'E', message: 'm' }).slice(0, 10));
  a.write(encodeReadiness({ type: 'error', code: 'E', message: 'm' }).slice(10));
  assert.deepEqual(await got, { type: 'error', code: 'E', message: 'm' });

  const b = new PassThrough();
  const eof = readReadiness(b, 5000);
  b.end('{"type":"rea');
  assert.equal(await eof, null);

  const c = new PassThrough();
  await assert.rejects(readReadiness(c, 20), (e: unknown) => e instanceof SupervisorError && e.code === 'ERR_SUPERVISOR_TIMEOUT');
});

test("the supervisor's error codes come back as the matching error classes", () => {
  assert.ok(errorFromSupervisor('ERR_USAGE', 'x') instanceof UsageError);
  assert.ok(errorFromSupervisor('ERR_PARTITION_NOT_FOUND', 'x') instanceof UsageError);
  assert.ok(errorFromSupervisor('ERR_CORRUPT_IMAGE', 'x') instanceof CorruptImageError);
  assert.ok(errorFromSupervisor('ERR_UNSUPPORTED_IMAGE', 'x') instanceof UnsupportedImageError);
  const other = errorFromSupervisor('EBUSY', 'busy');
  assert.ok(other instanceof SupervisorError);
  assert.equal(other.code, 'EBUSY');
});

test('the supervisor configuration is validated before anything starts', (t) => {
  const dir = tempDir(t);
  const image = `${dir}/a.img`;
  writeFileSync(image, Buffer.alloc(4096));
  const cfg = buildSupervisorConfig({ image, runDir: dir, partition: { name: 'root' }, mount: { dir, options: 'noatime' }, watchPid: 1 }, `${dir}/log`);
  assert.deepEqual(cfg, {
    image,
    partition: { name: 'root' },
    readOnly: false,
    mount: { dir, options: 'noatime' },
    connections: 1,
    timeoutSeconds: 30,
    watchPid: 1,
    runDir: dir,
    logFile: `${dir}/log`,
    interface: 'auto',
  });
  for (const bad of [{ connections: 0 }, { connections: 17 }, { timeoutSeconds: 0 }, { watchPid: -3 }, { image: `${dir}/missing` }, { mount: { dir: `${dir}/nope` } }]) {
    assert.throws(() => buildSupervisorConfig({ image, runDir: dir, ...bad }, 'l'), { code: 'ERR_USAGE' }, JSON.stringify(bad));
  }
});

test('--allow-backing roots reach the supervisor as absolute paths, and must exist', (t) => {
  const dir = tempDir(t);
  const image = `${dir}/disk.raw`;
  writeFileSync(image, Buffer.alloc(4096));
  const cwd = process.cwd();
  process.chdir(dir);
  t.after(() => process.chdir(cwd));
  mkdirSync(`${dir}/golden`);
  const cfg = buildSupervisorConfig({ image, runDir: dir, allowBacking: ['golden'] }, `${dir}/log`);
  assert.deepEqual(cfg.allowBacking, [`${dir}/golden`]);
  assert.equal(buildSupervisorConfig({ image, runDir: dir }, 'l').allowBacking, undefined);
  assert.throws(() => buildSupervisorConfig({ image, runDir: dir, allowBacking: ['nowhere'] }, 'l'), { code: 'ERR_USAGE', message: /--allow-backing .*nowhere/ });
});
