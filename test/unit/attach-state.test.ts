// State files of attached devices (src/kernel/state.ts): validation field by field, atomic
// writes, listing with broken files reported, and removal guarded by the owning pid.

import assert from 'node:assert/strict';
import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { listDeviceStates, parseDeviceState, readDeviceState, removeDeviceState, StateFileError, statePath, writeDeviceState, type DeviceState } from '../../src/kernel/state.js';
import { tempDir } from '../helpers/peers.js';

const GOOD: DeviceState = {
  version: 1,
  index: 3,
  device: '/dev/nbd3',
  image: '/images/disk.qcow2',
  format: 'qcow2',
  partition: { name: 'root' },
  readOnly: false,
  pid: 4242,
  mountpoint: '/mnt/x',
  connections: 2,
  created: '2026-01-02T03:04:05.000Z',
  interface: 'netlink',
  backend: 'imgbd:/images/disk.qcow2',
  log: '/run/imgbd/nbd3.log',
};

test('a valid state round-trips through its JSON', () => {
  assert.deepEqual(parseDeviceState(JSON.stringify(GOOD), 'x'), GOOD);
  assert.deepEqual(parseDeviceState(JSON.stringify({ ...GOOD, partition: 2, mountpoint: null }), 'x'), { ...GOOD, partition: 2, mountpoint: null });
});

const MUTATIONS: Array<[string, Record<string, unknown>]> = [
  ['version', { version: 2 }],
  ['index', { index: -1 }],
  ['index', { index: 1.5 }],
  ['device', { device: '/dev/nbd4' }],
  ['image', { image: 'relative/path' }],
  ['format', { format: 'Q COW' }],
  ['partition', { partition: 0 }],
  ['partition', { partition: 257 }],
  ['partition', { partition: { name: 3 } }],
  ['readOnly', { readOnly: 'no' }],
  ['pid', { pid: 0 }],
  ['pid', { pid: '12' }],
  ['mountpoint', { mountpoint: 'mnt' }],
  ['connections', { connections: 0 }],
  ['connections', { connections: 65 }],
  ['created', { created: 'yesterday' }],
  ['interface', { interface: 'ublk' }],
  ['backend', { backend: null }],
  ['log', { log: 5 }],
];

for (const [field, change] of MUTATIONS) {
  test(`a state with a bad ${field} (${JSON.stringify(change[field])}) is refused naming the field`, () => {
    assert.throws(
      () => parseDeviceState(JSON.stringify({ ...GOOD, ...change }), 'f.json'),
      (e: unknown) => e instanceof StateFileError && e.code === 'ERR_STATE_FILE' && e.message.includes(`field ${field}`),
    );
  });
}

test('a missing field, non-JSON and non-objects are refused', () => {
  const { pid: _pid, ...noPid } = GOOD;
  assert.throws(() => parseDeviceState(JSON.stringify(noPid), 'f'), /field pid/);
  assert.throws(() => parseDeviceState('{"version":1', 'f'), /not JSON/);
  assert.throws(() => parseDeviceState('[1]', 'f'), /not a JSON object/);
  assert.throws(() => parseDeviceState('null', 'f'), /not a JSON object/);
});

test('write, read, list and remove; no temporary file is left', (t) => {
  const dir = join(tempDir(t), 'run');
  writeDeviceState(dir, GOOD);
  writeDeviceState(dir, { ...GOOD, index: 0, device: '/dev/nbd0', pid: 7 });
  assert.deepEqual(readDeviceState(dir, 3), GOOD);
  assert.equal(readDeviceState(dir, 9), null);
  assert.deepEqual(readdirSync(dir).sort(), ['nbd0.json', 'nbd3.json']);
  const listing = listDeviceStates(dir);
  assert.deepEqual(listing.states.map((s) => s.index), [0, 3]);
  assert.deepEqual(listing.errors, []);
  assert.equal(removeDeviceState(dir, 3), true);
  assert.equal(removeDeviceState(dir, 3), false);
  assert.deepEqual(listDeviceStates(join(dir, 'absent')), { states: [], errors: [] });
});

test('a broken or misplaced state file is listed as an error, the others still load', (t) => {
  const dir = tempDir(t);
  writeDeviceState(dir, GOOD);
  writeFileSync(join(dir, 'nbd1.json'), '{"version":1,"index":1');
  // nbd5.json claiming to be device 3.
  writeFileSync(join(dir, 'nbd5.json'), JSON.stringify(GOOD));
  writeFileSync(join(dir, 'notes.txt'), 'ignored');
  const { states, errors } = listDeviceStates(dir);
  assert.deepEqual(states.map((s) => s.index), [3]);
  assert.equal(errors.length, 2);
  assert.ok(errors.every((e) => e instanceof StateFileError));
  assert.ok(errors.some((e) => e.message.includes('records device 3')));
});

test('removal is refused when the state belongs to another supervisor', (t) => {
  const dir = tempDir(t);
  writeDeviceState(dir, GOOD);
  assert.equal(removeDeviceState(dir, 3, 999), false);
  assert.deepEqual(readDeviceState(dir, 3), GOOD);
  assert.equal(removeDeviceState(dir, 3, GOOD.pid), true);
  assert.equal(readDeviceState(dir, 3), null);
  assert.equal(statePath(dir, 3), join(dir, 'nbd3.json'));
});
