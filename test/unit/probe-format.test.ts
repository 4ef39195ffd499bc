// Format probing and opening: magic-only detection built from bytes written here (not by the
// code under test), an error rather than "raw" for a known format without a driver, and no
// probing at all when the format is given.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { BlockDevice } from '../../src/block/device.js';
import { RequestError, UnsupportedImageError } from '../../src/errors.js';
import { openImage, openImageWithFormat } from '../../src/formats/open.js';
import { probeFormat, PROBE_HEAD_BYTES } from '../../src/formats/probe.js';
import { createFormatRegistry, type FormatDriver } from '../../src/formats/registry.js';
import { tempDir } from '../helpers/peers.js';

function head(bytes: Buffer, at = 0): Buffer {
  const h = Buffer.alloc(PROBE_HEAD_BYTES);
  bytes.copy(h, at);
  return h;
}

const QCOW2 = Buffer.from('514649fb00000003', 'hex');
const QED = Buffer.from('51454400', 'hex');
const VDI_SIG = Buffer.from('7f10dabe', 'hex');

const magicTable: Array<[string, Buffer, string]> = [
  ['qcow2', head(QCOW2), 'qcow2'],
  ['qed', head(QED), 'qed'],
  ['vdi (signature at 0x40)', head(Buffer.concat([Buffer.from('<<< Oracle VM VirtualBox Disk Image >>>\n'), Buffer.alloc(24), VDI_SIG])), 'vdi'],
  ['vmdk sparse', head(Buffer.from('KDMV')), 'vmdk'],
  ['vpc', head(Buffer.from('conectix')), 'vpc'],
  ['vhdx', head(Buffer.from('vhdxfile')), 'vhdx'],
  ['luks', head(Buffer.from('4c554b53babe0001', 'hex')), 'luks'],
];

for (const [what, h, format] of magicTable) {
  test(`a ${what} header with no driver is refused, naming ${format}`, () => {
    assert.throws(() => probeFormat(h, createFormatRegistry()), (e: unknown) => e instanceof UnsupportedImageError && e.message.includes(format));
  });
}

test('anything else probes as raw, including near-misses of every magic', () => {
  const r = createFormatRegistry();
  assert.equal(probeFormat(Buffer.alloc(PROBE_HEAD_BYTES), r), 'raw');
  assert.equal(probeFormat(head(Buffer.from('514649fa', 'hex')), r), 'raw');
  assert.equal(probeFormat(head(Buffer.from('QED1')), r), 'raw');
  assert.equal(probeFormat(head(VDI_SIG, 0x41), r), 'raw', 'the VDI signature counts only at 0x40');
  assert.equal(probeFormat(head(VDI_SIG, 0), r), 'raw');
  // A head shorter than a magic's end cannot match it.
  assert.equal(probeFormat(Buffer.from('QFI'), r), 'raw');
});

function fakeDriver(name: string, magic: Buffer, opened: unknown[]): FormatDriver {
  return {
    name,
    probe: (h) => h.subarray(0, magic.length).equals(magic),
    open: async (path, opts) => {
      opened.push({ path, opts });
      return { sizeBytes: 0 } as unknown as BlockDevice;
    },
  };
}

test('a registered driver wins the probe and is opened with probed: true', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'img');
  writeFileSync(path, head(QCOW2));
  const r = createFormatRegistry();
  const opened: unknown[] = [];
  r.register(fakeDriver('qcow2', QCOW2.subarray(0, 4), opened));
  assert.equal(probeFormat(head(QCOW2), r), 'qcow2');
  const res = await openImageWithFormat(path, { registry: r, readOnly: true, allowBacking: false });
  assert.equal(res.format, 'qcow2');
  assert.equal(res.probed, true);
  assert.deepEqual(opened, [{ path, opts: { readOnly: true, allowBacking: false, probed: true } }]);
});

test('with a format given there is no probing: a qcow2 header opens as raw when asked', async (t) => {
  const path = join(tempDir(t), 'img');
  writeFileSync(path, head(QCOW2));
  const res = await openImageWithFormat(path, { format: 'raw' });
  t.after(() => res.device.close());
  assert.equal(res.probed, false);
  assert.equal(res.device.sizeBytes, PROBE_HEAD_BYTES);
  assert.equal(res.device.blockSizes().minimum, 1, 'no probed-raw restrictions');
  // Explicit raw may rewrite its header freely.
  await res.device.pwrite!(Buffer.from('QED\0', 'latin1'), 0);
});

test('without a format: a qcow2 file is never opened as raw', async (t) => {
  const path = join(tempDir(t), 'img');
  writeFileSync(path, head(QCOW2));
  await assert.rejects(openImage(path, { registry: createFormatRegistry() }), UnsupportedImageError);
});

test('without a format: a plain file is probed raw, and the guard is on', async (t) => {
  const path = join(tempDir(t), 'img');
  writeFileSync(path, Buffer.alloc(4096, 7));
  const res = await openImageWithFormat(path, { registry: createFormatRegistry() });
  t.after(() => res.device.close());
  assert.equal(res.format, 'raw');
  assert.equal(res.probed, true);
  await assert.rejects(res.device.pwrite!(head(QCOW2), 0), (e: unknown) => e instanceof RequestError && e.errno === 'EPERM');
});

test('a short file (under 512 bytes) probes from its zero-filled head', async (t) => {
  const path = join(tempDir(t), 'img');
  writeFileSync(path, Buffer.from('hello'));
  const dev = await openImage(path, { registry: createFormatRegistry(), readOnly: true });
  t.after(() => dev.close());
  assert.equal(dev.sizeBytes, 5);
});

test('an unknown explicit format is refused by name', async (t) => {
  const path = join(tempDir(t), 'img');
  writeFileSync(path, Buffer.alloc(512));
  await assert.rejects(openImage(path, { format: 'qcow3', registry: createFormatRegistry() }), (e: unknown) => e instanceof UnsupportedImageError && e.message.includes('qcow3'));
});
