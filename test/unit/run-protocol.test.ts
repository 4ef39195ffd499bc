// The run command ↔ container init channel (src/container/run-protocol.ts): plans are
// validated field by field, failures too, and a line split anywhere reads the same.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { decodeFailure, decodePlan, encodeFailure, encodePlan, LineReader, MAX_RUN_LINE_BYTES, type RunPlan } from '../../src/container/run-protocol.js';

const PLAN: RunPlan = {
  device: '/dev/nbd3',
  fstype: 'ext4',
  readOnly: true,
  mountFlags: 1,
  mountData: 'errors=remount-ro',
  stageDir: '/run/imgbd',
  hostname: 'imgbd',
  argv: ['sh', '-c', 'cat /etc/hello; exit 7'],
  env: ['PATH=/usr/bin:/bin', 'HOME=/root'],
  cwd: '/',
};

/** The plan as the init receives it, written by hand (not by encodePlan). */
const PLAN_LINE =
  '{"type":"plan","device":"/dev/nbd3","fstype":"ext4","readOnly":true,"mountFlags":1,"mountData":"errors=remount-ro",' +
  '"stageDir":"/run/imgbd","hostname":"imgbd","argv":["sh","-c","cat /etc/hello; exit 7"],"env":["PATH=/usr/bin:/bin","HOME=/root"],"cwd":"/"}';

test('a hand-written plan line decodes to the plan, and encodePlan writes that line', () => {
  assert.deepEqual(decodePlan(PLAN_LINE), PLAN);
  assert.equal(encodePlan(PLAN), `${PLAN_LINE}\n`);
});

test('every invalid plan field is refused, naming the field', () => {
  const base = JSON.parse(PLAN_LINE) as Record<string, unknown>;
  const cases: Array<[string, unknown, string]> = [
    ['type', 'error', 'type'],
    ['device', 'nbd3', 'device'],
    ['device', 7, 'device'],
    ['fstype', 'ext4; rm', 'fstype'],
    ['fstype', '', 'fstype'],
    ['readOnly', 'yes', 'readOnly'],
    ['mountFlags', -1, 'mountFlags'],
    ['mountFlags', 1.5, 'mountFlags'],
    ['mountFlags', 0, 'mountFlags'], // read-only without MS_RDONLY
    ['mountData', null, 'mountData'],
    ['stageDir', 'run/imgbd', 'stageDir'],
    ['hostname', 3, 'hostname'],
    ['argv', [], 'argv'],
    ['argv', [''], 'argv'],
    ['argv', ['sh', 5], 'argv'],
    ['argv', ['a\0b'], 'argv'],
    ['env', ['NOEQUALS'], 'env'],
    ['env', 'PATH=/bin', 'env'],
    ['cwd', 'relative', 'cwd'],
  ];
  for (const [field, value, named] of cases) {
    const line = JSON.stringify({ ...base, [field]: value });
    assert.throws(() => decodePlan(line), (e: Error & { code?: string }) => e.code === 'ERR_RUN_PROTOCOL' && e.message.includes(named), `${field}=${JSON.stringify(value)}`);
  }
  assert.throws(() => decodePlan('not json'), { code: 'ERR_RUN_PROTOCOL' });
  assert.throws(() => decodePlan('[1]'), { code: 'ERR_RUN_PROTOCOL' });
});

test('failures carry an optional shell-style exit status in 0..255', () => {
  assert.deepEqual(decodeFailure('{"type":"error","code":"ENOENT","message":"x: not found","exitStatus":127}'), { code: 'ENOENT', message: 'x: not found', exitStatus: 127 });
  assert.deepEqual(decodeFailure('{"type":"error","code":"ERR_ROOTFS","message":"no /proc"}'), { code: 'ERR_ROOTFS', message: 'no /proc' });
  assert.equal(encodeFailure({ code: 'EACCES', message: 'm', exitStatus: 126 }), '{"type":"error","code":"EACCES","message":"m","exitStatus":126}\n');
  for (const bad of ['{"type":"error","code":"E","message":"m","exitStatus":256}', '{"type":"error","code":"E","message":"m","exitStatus":"1"}', '{"type":"plan"}', '{"type":"error","code":1,"message":"m"}']) {
    assert.throws(() => decodeFailure(bad), { code: 'ERR_RUN_PROTOCOL' }, bad);
  }
});

test('LineReader: the line split at every byte reads the same', () => {
  const bytes = Buffer.from(`${PLAN_LINE}\n`);
  for (let cut = 0; cut <= bytes.length; cut++) {
    const r = new LineReader();
    const first = r.push(bytes.subarray(0, cut));
    const line = first ?? r.push(bytes.subarray(cut));
    assert.equal(line, PLAN_LINE, `cut at ${cut}`);
  }
});

test('LineReader refuses a line longer than the limit before buffering it', () => {
  const r = new LineReader();
  r.push(Buffer.alloc(MAX_RUN_LINE_BYTES - 1, 0x61));
  assert.throws(() => r.push(Buffer.alloc(2, 0x61)), { code: 'ERR_RUN_PROTOCOL' });
});
